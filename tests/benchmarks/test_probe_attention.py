"""probe_attention reads one attention softmax per layer and reports per-needle mass that sums as it should."""
import json

import jax

from benchmarks import probe_attention
from fm_jax.checkpoint import save_params
from fm_jax.config import get_config
from fm_jax.model import init_params


def test_probe_reads_every_layers_attention(tmp_path):
    c = get_config("tiny", vocab_size=512)
    save_params(tmp_path / "ckpt", init_params(c, jax.random.key(0)), c)
    out = tmp_path / "probe.json"
    probe_attention.main(["--ckpt", str(tmp_path / "ckpt"), "--length", "256", "--n", "2", "--out", str(out)])
    d = json.loads(out.read_text())
    csa = [l for l, r in enumerate(c.compress_ratios) if r == c.csa_ratio]
    assert sorted(d["layers_per_head"]) == sorted(f"L{l}" for l in csa)
    for per_head in d["layers_per_head"].values():
        for target, other, is_max in zip(per_head["target"], per_head["other_mean"], per_head["target_is_max"]):
            assert 0 <= target <= 1 and 0 <= other <= 1 and 0 <= is_max <= 1
            assert target + 3 * other <= 1 + 1e-3  # needle masses are disjoint parts of one softmax
            assert target + other > 0             # random weights attend everywhere a little
    assert 0 <= d["first_token_correct"] <= 1
