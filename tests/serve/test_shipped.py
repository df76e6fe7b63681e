"""The trained miniature shipped in `checkpoints/mini` (issue 9 item 7): loaded through the public
loaders, it answers held-out prompts in `full` and in `lsa` at a tenth of the CSA pages, while the
same budget spent on the newest pages does not find the needle.

Only what the shipped model does is asserted: niah_single and local on any prompt, and fixed 4K prompts of
seeds HELDOUT_SEED + 0..3 that it answers: a multi-key and a multi-value one in full mode and in LSA, a
variable-tracking one in full mode. Its accuracy over random held-out prompts is in checkpoints/mini/README.md
and benchmarks/results/reproduction-attempt9-h200/."""
import json

import jax
import numpy as np
import pytest

from fm_jax import checkpoint, interop
from serve import generate as cli
from serve.engine import LSAConfig, generate
from serve.shipped import SHIPPED, load_model, load_shipped
from train import tasks as T

LENGTH = 1024  # inside the training curriculum (512 -> 1024 -> 4096), fast on CPU


@pytest.fixture(scope="module")
def shipped():
    return load_shipped()


def test_shipped_files_are_small_and_load_through_the_public_loaders(shipped):
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size <= 25 * 2 ** 20
    params, config, (icfg, iparams) = shipped
    assert config.name == "mini" and config.compress_ratios == (0, 0, 4, 128, 4, 128, 4, 128, 4)
    again = checkpoint.restore_params(SHIPPED / "backbone", checkpoint.load_config(SHIPPED / "backbone"))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)))
    icfg2, _ = interop.load_flashmemory_checkpoint(str(SHIPPED / "memory_indexer.safetensors"))
    assert icfg2 == icfg and set(icfg.target_layers) <= set(config.csa_layers)


def test_answers_in_full_and_lsa_and_recency_misses(shipped):
    params, config, indexer = shipped
    examples = [T.make_example(name, LENGTH, T.HELDOUT_SEED + i) for name in ("niah_single", "local") for i in (0, 1)]
    prompt = np.stack([e.prompt for e in examples])
    lsa = LSAConfig.at_budget(config, LENGTH, 0.1)
    scores = {}
    for mode in ("full", "lsa", "recency"):
        res = generate(params, config, prompt, len(examples[0].answer) + 1, mode=mode,
                       indexer=indexer if mode == "lsa" else None, lsa=lsa)
        scores[mode] = [T.score(e.task, e, t) for e, t in zip(examples, res.tokens)]
        if mode != "full":
            assert res.stats["device_csa_fraction"] < 0.2, res.stats["device_csa_fraction"]
    assert scores["full"] == [1.0] * 4 and scores["lsa"] == [1.0] * 4, scores
    assert max(scores["recency"][:2]) < 1.0, scores  # the needles sit beyond the recency tail


def test_load_model_arguments(tmp_path):
    with pytest.raises(ValueError, match="go together"):
        load_model(params=str(SHIPPED / "backbone"))
    with pytest.raises(ValueError, match="not both"):
        load_model(str(SHIPPED), str(SHIPPED / "backbone"), str(SHIPPED / "memory_indexer.safetensors"))
    with pytest.raises(FileNotFoundError, match="holds no trained model"):
        load_model(str(tmp_path))


def test_cli_answers_a_task_prompt(capsys):
    # the shapes of the test above (4 requests of 1024 tokens, 4 new tokens): its compiled programs serve
    assert cli.main(["--context", str(LENGTH), "--batch", "4", "--compare", "--prefill-chunk", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "niah_single"
    assert [e["seed"] for e in out["examples"]] == [T.HELDOUT_SEED + i for i in range(4)]
    by_mode = {m: [a for a in out["answers"] if a["mode"] == m] for m in ("lsa", "full", "recency", "random")}
    assert all(len(v) == 4 for v in by_mode.values())
    assert all(a["correct"] for a in by_mode["lsa"] + by_mode["full"])
    assert [a["generated"][:3] for a in by_mode["lsa"]] == [e["expected"] for e in out["examples"]]
    assert out["stats"]["lsa"]["device_csa_fraction"] < 0.2 and out["stats"]["full"]["device_csa_fraction"] == 1.0


def test_multi_needle_prompts_at_an_eighth_of_the_csa_kv(shipped):
    # several needles must be resident at once: the Memory Indexer's page choice, not one lucky page
    params, config, indexer = shipped
    examples = [T.make_example("niah_multikey", 4096, T.HELDOUT_SEED + 1),
                T.make_example("niah_multivalue", 4096, T.HELDOUT_SEED + 1),
                T.make_example("var_tracking", 4096, T.HELDOUT_SEED)]
    width = max(len(e.answer) for e in examples) + 1
    prompt = np.stack([e.prompt for e in examples])
    lsa = LSAConfig.at_budget(config, 4096, 0.1)
    for mode in ("full", "lsa"):
        res = generate(params, config, prompt, width, mode=mode, indexer=indexer if mode == "lsa" else None, lsa=lsa)
        scores = [T.score(e.task, e, t) for e, t in zip(examples, res.tokens)]
        # variable tracking in full mode only: 10% of a 4K prompt is 5 pages besides the recency tail for three
        # chains of statements, and LSA loses hops there (0.58 at 4K, 1.00 at 8K and 16K: checkpoints/mini/README.md)
        asserted = scores if mode == "full" else scores[:2]
        assert asserted == [1.0] * len(asserted), (mode, scores)
        if mode == "lsa":
            assert res.stats["device_csa_fraction"] < 0.15, res.stats["device_csa_fraction"]
