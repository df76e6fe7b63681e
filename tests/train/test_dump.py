"""train.dump on the tiny preset: the backbone's top-k logits, task documents (prompt ⧺ answer) with their
decode-boundary queries, and the query / hidden alignment with the engine."""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_jax import backbone
from fm_jax import model as fm_model
from fm_jax.config import get_config
from train import data as D
from train import dump
from train.labels import golden_labels, kept_picks, n_candidates, task_queries

TAU = 8


@pytest.fixture(scope="module")
def tiny():
    c = get_config("tiny")
    return c, fm_model.init_params(c, jax.random.PRNGKey(0))


def test_backbone_hands_out_sorted_topk_logits(tiny):
    c, params = tiny
    toks = jax.random.randint(jax.random.PRNGKey(1), (1, 96), 0, c.vocab_size)
    _, _, aux = backbone.run_sequence(params, c, toks, impl="xla")
    for lyr in c.csa_layers:
        ids, lg = np.asarray(aux[lyr]["topk"]), np.asarray(aux[lyr]["topk_logits"])
        assert lg.dtype == np.float32 and lg.shape == ids.shape
        assert np.array_equal(ids == -1, lg == -np.inf)          # -inf exactly where there is no pick
        assert np.all(np.diff(np.where(lg == -np.inf, -1e30, lg), axis=-1) <= 0)  # descending
        # each step picks index_topk of its visible entries (all of them while fewer exist)
        n_vis = np.minimum(n_candidates(np.arange(96), c.csa_ratio), ids.shape[-1])
        np.testing.assert_array_equal((ids[0] >= 0).sum(-1), n_vis)


@dataclass
class _Example:
    task: str
    prompt: np.ndarray
    answer: np.ndarray
    meta: dict


def _fake_tasks(vocab):
    """Stands in for train.tasks (written elsewhere): the prompt is filler plus a needle, the answer the
    needle's value."""
    mod = types.ModuleType("train.tasks")
    mod.TASKS = ("needle", "recall")

    def make_example(name, context_len, seed):
        rng = np.random.default_rng([seed, len(name)])
        prompt = rng.integers(1, vocab, context_len).astype(np.int32)
        return _Example(name, prompt, rng.integers(1, vocab, 5 if name == "needle" else 13).astype(np.int32),
                        {"seed": seed})

    mod.make_example = make_example
    return mod


def test_task_documents_are_prompt_then_answer_with_decode_boundary_queries(tiny, tmp_path, monkeypatch):
    c, params = tiny
    monkeypatch.setitem(sys.modules, "train.tasks", _fake_tasks(c.vocab_size))
    import train

    monkeypatch.setattr(train, "tasks", sys.modules["train.tasks"], raising=False)
    out = str(tmp_path / "tasks")
    s = dump.main(["--out", out, "--tasks", "needle,recall", "--n-docs", "3", "--length", "200", "--tau", str(TAU),
                   "--prompt-queries", "4", "--min-candidates", "4", "--pad-multiple", "64", "--impl", "xla",
                   "--no-progress"])
    assert s["docs_written"] == 3
    m = D.read_manifest(out)
    assert m["prompt_queries"] == 4 and m["top_p"] == 0.6 and m["min_layers"] == 2  # tiny: 2 CSA layers vote
    assert [d["id"] for d in m["docs"]] == ["needle-0-000000", "needle-0-000002", "recall-0-000001"]  # by file
    assert [d["n_tokens"] for d in m["docs"]] == [205, 205, 213] and [d["prompt_len"] for d in m["docs"]] == [200] * 3
    ds = D.IndexerDataset(out)
    mod = sys.modules["train.tasks"]
    for di, entry in enumerate(m["docs"]):
        doc = ds.doc(di)
        ex = mod.make_example(entry["id"].split("-")[0], 200, int(entry["id"].split("-")[-1]))
        # decode boundaries 200, 208 (13-token answer) and 4 prompt boundaries 200 - j * 8, query = t - 1
        q = task_queries(200, entry["n_tokens"], TAU, c.csa_ratio, 4, 4)
        np.testing.assert_array_equal(doc.positions, q)
        assert 199 in doc.positions.tolist() and (207 in doc.positions.tolist()) == (entry["n_tokens"] > 208)
        assert sum(int(p) < 199 for p in doc.positions) == 4
        if di:
            continue  # the content checks below run the backbone again: once is enough
        # the stored hidden rows are the backbone's hidden states of prompt ⧺ answer (teacher forced; padded
        # as the dump pads, so the causal pass is the same computation)
        n = entry["n_tokens"]
        toks = np.zeros((1, 256), np.int32)
        toks[0, :n] = np.concatenate([ex.prompt, ex.answer])
        _, _, aux = backbone.run_sequence(params, c, jnp.asarray(toks), impl="xla")
        for lyr in ds.target_layers:  # eager vs jitted float32, stored in bf16: one rounding step apart at most
            np.testing.assert_allclose(np.asarray(doc.hidden[lyr], np.float32),
                                       np.asarray(aux[lyr]["hidden"][0, :n], np.float32), rtol=2 ** -7, atol=1e-5)
        # and the labels are golden_labels over the top-p kept picks of the dump's own (jitted) pass
        _, _, kept = dump._dump_forward(params, jnp.asarray(toks), config=c, targets=ds.target_layers,
                                        voters=tuple(c.csa_layers), top_p=0.6, impl="xla")
        kept = {v: np.asarray(k[0, :n]) for v, k in zip(c.csa_layers, kept)}
        for v in c.csa_layers:  # which are the backbone's top-k cut by the release's top-p
            ref_kept = np.asarray(kept_picks(aux[v]["topk"][0, :n], aux[v]["topk_logits"][0, :n], 0.6))
            assert np.mean(ref_kept == kept[v]) > 0.99
        ref, _ = golden_labels(kept, doc.positions, TAU, c.csa_ratio, 2)
        np.testing.assert_array_equal(doc.labels.indices, ref.indices)
        np.testing.assert_array_equal(doc.labels.pointers, ref.pointers)
        np.testing.assert_array_equal(doc.labels.scores, ref.scores)
    with pytest.raises(ValueError, match="unknown task"):
        dump.main(["--out", str(tmp_path / "bad"), "--tasks", "nope", "--n-docs", "1", "--no-progress"])
    with pytest.raises(SystemExit, match="--n-docs"):
        dump.main(["--out", str(tmp_path / "bad"), "--tasks", "needle", "--no-progress"])


def test_dump_query_matches_the_engine_boundary(tiny):
    """The engine's first Memory Indexer query after a prefill of t tokens is the hidden state prefill
    returns for token t - 1: the dump's query token s = t - 1 stores that row of the uncached pass."""
    c, params = tiny
    t = 48
    toks = jax.random.randint(jax.random.PRNGKey(2), (1, 64), 0, c.vocab_size)
    _, _, aux = backbone.run_sequence(params, c, toks, impl="xla")
    _, _, hidden = fm_model.prefill_with_hidden(params, c, toks[:, :t], jnp.array([t]), 64, "xla")
    for lyr in c.csa_layers:
        np.testing.assert_allclose(np.asarray(hidden[lyr][0], np.float32),
                                   np.asarray(aux[lyr]["hidden"][0, t - 1], np.float32), rtol=1e-5, atol=1e-5)
