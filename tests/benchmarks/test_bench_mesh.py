"""benchmarks/bench_mesh.py: the agreement it records follows its definition and bad meshes are refused.
(Its --smoke run costs ~25 s of CPU, mostly compilation, and is left out of CI; the engine path it drives
is tested on meshes by tests/serve/test_engine_mesh.py.)"""
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks.bench_mesh import agreement, main, parse_meshes


def test_agreement_compares_logits_only_until_tokens_differ():
    tokens = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    logits = np.zeros((2, 4, 3), np.float32)
    ref = SimpleNamespace(tokens=tokens, logits=logits)
    mine_tokens = tokens.copy()
    mine_tokens[1, 2:] = 0                       # request 1 differs from step 2 on
    mine_logits = logits.copy()
    mine_logits[0, 1, 0] = 1e-3                  # request 0, first decode step
    mine_logits[1, 2, 1] = 0.5                   # the step whose token differs: still compared
    mine_logits[1, 3, 2] = 9.0                   # after it: a different sequence, not compared
    a = agreement(ref, SimpleNamespace(tokens=mine_tokens, logits=mine_logits))
    assert not a["tokens_equal"] and a["first_token_diff_step"] == [4, 2]
    assert a["token_agreement_per_step"] == [1.0, 1.0, 0.5, 0.5]
    assert a["logits_max_abs_diff_prefill"] == 0.0
    assert a["logits_max_abs_diff_first_decode"] == pytest.approx(1e-3)
    assert a["logits_max_abs_diff_agreeing_steps"] == 0.5


def test_bad_meshes_are_refused(tmp_path):
    assert parse_meshes("2x1,1x2") == [(2, 1), (1, 2)]
    with pytest.raises(SystemExit, match="DATAxMODEL"):
        parse_meshes("2by1")
    with pytest.raises(SystemExit, match="needs 16 devices"):
        main(["--smoke", "--meshes", "4x4", "--out", str(tmp_path / "x.json")])
