"""train.pretrain: a step lowers the loss, resume reproduces the uninterrupted run, curriculum parsing."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_jax.config import get_config
from train import pretrain as P
from train import tasks as T

TINY = ["--preset", "tiny", "--override", "vocab_size=512", "--tasks", "niah_single,local",
        "--curriculum", "384:dense:0.5,384:sparse:0.5", "--tokens-per-step", "768", "--eval-every", "0",
        "--no-progress", "--no-tensorboard", "--warmup", "1", "--log-every", "1", "--save-every", "2"]


def test_parse_curriculum_covers_every_step():
    ph = P.parse_curriculum("1024:dense:1,4096:sparse:3", 10, 8192)
    assert [(p.length, p.stage, p.start, p.end, p.batch) for p in ph] == [
        (1024, "dense", 0, 2, 8), (4096, "sparse", 2, 10, 2)]
    assert P.phase_at(ph, 9).length == 4096
    with pytest.raises(ValueError, match="LEN:STAGE:FRACTION"):
        P.parse_curriculum("1024:dense", 10, 8192)
    with pytest.raises(ValueError, match="STAGE"):
        P.parse_curriculum("1024:fast:1", 10, 8192)


def test_one_step_lowers_the_loss_on_a_fixed_batch():
    c = get_config("tiny", vocab_size=512, hc_mult=2, ffn="moe", n_hash_layers=1)
    args = P.build_parser().parse_args(["--out", "x", "--lr", "3e-3", "--warmup", "0", "--steps", "100"])
    key = jax.random.PRNGKey(0)
    template = P.param_template(c, key)
    master = P.init_params(c.replace(dtype="float32"), key)
    tx, _ = P.make_optimizer(args, args.steps)
    trainable, frozen = P.split_trainable(master)
    assert any(x is not None for x in jax.tree.leaves(frozen, is_leaf=lambda x: x is None))  # tid2eid is frozen
    state = P.init_state(master, tx)
    tokens, mask = P.fixed_batch(("niah_single",), 384, 0, 2)
    batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask)}
    step = P.build_train_step(c, template, tx, 1.0)
    tid = np.asarray(master["layers"][0]["ffn"]["tid2eid"])
    state, m0 = step(state, batch, jnp.asarray(True))
    state, m1 = step(state, batch, jnp.asarray(True))
    assert float(m1["loss"]) < float(m0["loss"])
    row_acc = np.asarray(m0.pop("row_acc"))  # per row: what the per-task curves (`acc/<task>`) average
    assert row_acc.shape == (2,) and np.all((row_acc >= 0) & (row_acc <= 1))
    row_first = np.asarray(m0.pop("row_first"))  # per row: what `acc1/<task>` averages
    assert row_first.shape == (2,) and set(row_first.tolist()) <= {0.0, 1.0}
    assert np.all(np.isfinite([float(v) for v in m0.values()]))
    np.testing.assert_array_equal(np.asarray(state["params"]["layers"][0]["ffn"]["tid2eid"]), tid)


def _lines(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    P.main(["--out", full, "--steps", "4", *TINY])
    r = P.main(["--out", cut, "--steps", "4", "--stop-after", "2", *TINY])
    assert r.get("stopped")
    r = P.main(["--out", cut, "--steps", "4", *TINY])
    assert r["resumed_from"] == 2
    a, b = _lines(os.path.join(full, "metrics.jsonl")), _lines(os.path.join(cut, "metrics.jsonl"))
    assert [x["step"] for x in b] == [1, 2, 3, 4]
    assert a == b
    assert os.path.isdir(os.path.join(cut, "params"))
    with open(os.path.join(cut, "summary.json")) as f:
        s = json.load(f)
    assert s["tokens_seen"] == 4 * 2 * (384 + P.ANSWER_ROOM)
    with pytest.raises(SystemExit, match="different settings"):
        P.main(["--out", cut, "--steps", "5", *TINY])


def test_init_params_continues_from_an_earlier_run(tmp_path):
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    P.main(["--out", first, "--steps", "2", *TINY])
    c = get_config("tiny", vocab_size=512)
    before = P.fm_ckpt.restore_params(os.path.join(first, "master"), c.replace(dtype="float32"))
    P.main(["--out", second, "--steps", "1", "--init-params", os.path.join(first, "master"), "--lr", "1e-9", *TINY])
    after = P.fm_ckpt.restore_params(os.path.join(second, "master"), c.replace(dtype="float32"))
    fresh = P.init_params(c.replace(dtype="float32"), jax.random.PRNGKey(0))
    close = lambda a, b: all(np.allclose(x, y, atol=1e-6) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert close(before, after) and not close(fresh, after)
    with pytest.raises(ValueError, match="different architecture"):
        P.main(["--out", str(tmp_path / "c"), "--steps", "1", "--init-params", os.path.join(first, "master"),
                *TINY, "--override", "d_model=32"])


def test_task_params_reach_the_batches_and_are_checked():
    t0, m0 = P.fixed_batch(("niah_single",), 512, 3, 2)
    t1, m1 = P.fixed_batch(("niah_single",), 512, 3, 2, {"niah_single": {"value_len": 16}})
    assert m1.sum() == 2 * 17 and m0.sum() == 2 * 4  # value tokens + EOS per row
    with pytest.raises(ValueError, match="not among the training tasks"):
        P.check_task_params(("local",), {"niah_single": {"value_len": 4}})
    with pytest.raises(ValueError, match="niah_single"):
        P.check_task_params(("niah_single",), {"niah_single": {"colour": 4}})


def test_task_accuracy_groups_rows_by_task():
    rows = [(jnp.asarray([1.0, 0.5]), ["niah_single", "local"]), (jnp.asarray([0.0, 1.0]), ["niah_single", "local"])]
    assert P.task_accuracy(rows) == {"acc/local": 0.75, "acc/niah_single": 0.5}
    assert P.task_accuracy([]) == {}
    firsts = [(jnp.asarray([1.0, -1.0]), ["niah_single", "local"]), (jnp.asarray([0.0, 1.0]), ["niah_single", "local"])]
    assert P.task_accuracy(firsts, "acc1") == {"acc1/local": 1.0, "acc1/niah_single": 0.5}  # -1: no supervised token


def test_task_names_accept_the_training_drill():
    assert P.task_names("recall_drill,niah_single,recall_drill") == ("recall_drill", "niah_single", "recall_drill")
    assert P.task_names("all") == T.TASKS  # 'all' is the evaluated suite, drills are opt-in
    with pytest.raises(ValueError, match="unknown task"):
        P.task_names("recall_drill,nope")


def test_prompt_weight_adds_the_prompt_loss():
    c = get_config("tiny", vocab_size=512)
    key = jax.random.PRNGKey(0)
    template = P.param_template(c, key)
    trainable, frozen = P.split_trainable(P.init_params(c.replace(dtype="float32"), key))
    tokens, mask = P.fixed_batch(("niah_single",), 384, 0, 2)
    batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask)}
    loss, m = P.loss_fn(trainable, frozen, template, c, batch, "dense", 0.5, 0.25)
    assert float(m["prompt_loss"]) > 0 and float(m["prompt_loss"]) != float(m["lm_loss"])
    np.testing.assert_allclose(float(loss), float(m["lm_loss"] + 0.25 * m["prompt_loss"] + 0.5 * m["kl"]),
                               rtol=1e-6)
