"""Task suite: every example is answerable by an independent reference parser of the documented grammar,
exact prompt lengths, determinism per seed, uniform depth, the scorer, the make_batch mask convention,
and the error cases."""
from __future__ import annotations

import time

import numpy as np
import pytest

from train import tasks as T


def reference_answer(prompt) -> list[int]:
    """Answer the question by reading the prompt as the module docstring's grammar says (no metadata)."""
    p = [int(t) for t in prompt]
    assert p[0] == T.BOS and p[-1] == T.ANSWER and p.count(T.QUERY) == 1
    q = p.index(T.QUERY)
    needles, assigns = [], {}
    i = 1
    while i < q:
        if p[i] == T.KEY:
            j = p.index(T.VAL, i)
            k = p.index(T.SEP, j)
            keys, vals = p[i + 1:j], p[j + 1:k]
            assert k < q and keys and vals
            assert all(x in T.KEY_TOKENS for x in keys) and all(v in T.VALUE_TOKENS for v in vals)
            needles.append((tuple(keys), tuple(vals)))
            i = k + 1
        elif p[i] == T.VAR:
            x, a, y, s = p[i + 1:i + 5]
            assert a == T.ASSIGN and s == T.SEP and x in T.KEY_TOKENS and x not in assigns
            assert y in T.KEY_TOKENS or y in T.VALUE_TOKENS
            assigns[x] = y
            i += 5
        else:
            assert p[i] in T.FILLER_TOKENS, f"non-filler token {p[i]} outside an item at {i}"
            i += 1
    question = p[q + 1:-1]
    if question[0] == T.VAR:
        assert len(question) == 2
        x, ans = question[1], []
        while x in T.KEY_TOKENS:
            x = assigns[x]
            ans.append(x)
        return ans
    whole = [v for k, v in needles if k == tuple(question)]
    if whole:  # needle question: every needle with this key tuple, in order of appearance
        return [t for v in whole for t in v]
    ans = []  # associative recall: one single-token key per question token, each stored exactly once
    for key in question:
        hits = [v for k, v in needles if k == (key,)]
        assert len(hits) == 1, f"key {key} stored {len(hits)} times"
        ans.extend(hits[0])
    return ans


PARAM_VARIANTS = {
    "niah_single": [{}, {"key_len": 1, "value_len": 5}, {"depth": 0.3}],
    "niah_multikey": [{}, {"n_needles": 16, "key_len": 1}, {"depth": 0.9}],
    "niah_multivalue": [{}, {"n_values": 2, "value_len": 1}],
    "mq_recall": [{}, {"n_pairs": 128, "n_queries": 128}, {"n_pairs": 4, "n_queries": 1}],
    "var_tracking": [{}, {"n_chains": 1, "n_hops": 1}, {"n_chains": 8, "n_hops": 6}],
    "local": [{}, {"window": 16}],
}


@pytest.mark.parametrize("name", T.TASKS)
def test_every_example_is_answerable_from_the_grammar(name):
    assert set(PARAM_VARIANTS) == set(T.TASKS)
    for params in PARAM_VARIANTS[name]:
        for context_len in (1024, 1500, 4096):
            for seed in range(8):
                ex = T.make_example(name, context_len, seed, **params)
                assert ex.task == name
                assert ex.prompt.dtype == np.int32 and ex.prompt.shape == (context_len,)
                assert ex.answer.dtype == np.int32 and ex.answer.shape == (T.answer_length(name, **params),)
                assert reference_answer(ex.prompt) == ex.answer.tolist()
                m = ex.meta
                np.testing.assert_array_equal(ex.prompt[m["answer_sources"]], ex.answer)
                assert set(ex.prompt[m["item_starts"]].tolist()) <= {T.KEY, T.VAR}
                assert ex.prompt[m["question_start"]] == T.QUERY
                n_filler = np.sum(ex.prompt >= T.FILLER_TOKENS.start)
                assert n_filler == m["filler_len"] == context_len - m["item_lengths"].sum() - (
                    context_len - m["question_start"]) - 1
                assert np.all((ex.answer >= T.KEY_TOKENS.start) & (ex.answer < T.VALUE_TOKENS.stop))
                assert np.all(ex.prompt < T.VOCAB_SIZE) and not np.any(ex.prompt == T.PAD)


def test_distractors_and_targets_are_as_documented():
    for seed in range(20):
        ex = T.make_example("niah_multikey", 2048, seed, n_needles=6)
        keys = [tuple(ex.prompt[s + 1:s + 3]) for s in ex.meta["item_starts"]]
        assert len(keys) == 6 and len(set(keys)) == 6
        q = ex.meta["question_start"]
        assert keys[ex.meta["target_items"][0]] == tuple(ex.prompt[q + 1:q + 3])
        ex = T.make_example("niah_multikey", 2048, seed, n_needles=32, key_len=1)  # collisions likely if unchecked
        assert len(set(ex.prompt[ex.meta["item_starts"] + 1].tolist())) == 32

        ex = T.make_example("niah_multivalue", 2048, seed)
        keys = {tuple(ex.prompt[s + 1:s + 3]) for s in ex.meta["item_starts"]}
        assert len(keys) == 1 and ex.meta["target_items"].tolist() == [0, 1, 2, 3]

        ex = T.make_example("mq_recall", 2048, seed, n_pairs=32, n_queries=8)
        q = ex.meta["question_start"]
        asked = ex.prompt[q + 1:-1]
        assert len(set(asked.tolist())) == 8 and len(ex.meta["item_starts"]) == 32
        # each answer token comes from a different pair
        assert len(set(ex.meta["target_items"].tolist())) == 8

        ex = T.make_example("var_tracking", 2048, seed, n_chains=3, n_hops=4)
        assert len(ex.meta["item_starts"]) == 12 and len(set(ex.meta["target_items"].tolist())) == 4
        # the answer is the hop sequence: all variables but the last hop, which is a value
        assert all(t in T.KEY_TOKENS for t in ex.answer[:-1]) and ex.answer[-1] in T.VALUE_TOKENS


def test_local_needle_sits_in_the_window_before_the_question():
    for window in (16, 200):
        starts = []
        for seed in range(200):
            ex = T.make_example("local", 4096, seed, window=window)
            (s,) = ex.meta["item_starts"]
            starts.append(ex.meta["question_start"] - s)
        assert max(starts) <= window and min(starts) >= 7
        assert max(starts) > window - 0.1 * window and min(starts) < 7 + 0.1 * window  # covers the window


def test_determinism_per_seed():
    for name in T.TASKS:
        a, b = T.make_example(name, 2048, 5), T.make_example(name, 2048, 5)
        np.testing.assert_array_equal(a.prompt, b.prompt)
        np.testing.assert_array_equal(a.answer, b.answer)
        np.testing.assert_array_equal(a.meta["item_starts"], b.meta["item_starts"])
        assert a.meta["depth"] == b.meta["depth"]
        c = T.make_example(name, 2048, 6)
        assert not np.array_equal(a.prompt, c.prompt)
    # tasks draw from different streams at the same seed
    assert not np.array_equal(T.make_example("niah_single", 2048, 5).prompt, T.make_example("local", 2048, 5).prompt)


def test_depth_is_uniform():
    depths = np.array([T.make_example("niah_single", 1024, s).meta["depth"] for s in range(2000)])
    assert depths.min() < 0.005 and depths.max() > 0.995
    hist = np.histogram(depths, bins=10, range=(0, 1))[0] / len(depths)
    assert np.all(np.abs(hist - 0.1) < 0.03), hist
    ks = np.max(np.abs(np.sort(depths) - (np.arange(len(depths)) + 0.5) / len(depths)))
    assert ks < 0.05
    for name in ("niah_multikey", "niah_multivalue", "mq_recall", "var_tracking"):
        pooled = np.concatenate([T.make_example(name, 1024, s).meta["target_depths"] for s in range(400)])
        hist = np.histogram(pooled, bins=5, range=(0, 1))[0] / len(pooled)
        assert np.all(np.abs(hist - 0.2) < 0.05), (name, hist)


def test_depth_parameter_pins_the_queried_needle():
    ex = T.make_example("niah_single", 1024, 0, depth=0.0)
    assert ex.meta["item_starts"][0] == 1
    ex = T.make_example("niah_single", 1024, 0, depth=1.0)
    assert ex.meta["item_starts"][0] + ex.meta["item_lengths"][0] == ex.meta["question_start"]
    for seed in range(10):
        ex = T.make_example("niah_multikey", 4096, seed, depth=0.5)
        assert abs(ex.meta["depth"] - 0.5) < 1e-3
        assert reference_answer(ex.prompt) == ex.answer.tolist()


def test_large_contexts():
    for name in ("mq_recall", "var_tracking"):
        ex = T.make_example(name, 131072, 1)
        assert ex.prompt.shape == (131072,)
        assert reference_answer(ex.prompt) == ex.answer.tolist()


def test_generation_is_fast():
    for context_len, budget_ms in ((4096, 5.0), (32768, 30.0)):
        T.make_example("mq_recall", context_len, 0)
        t0 = time.perf_counter()
        for s in range(10):
            T.make_example(T.TASKS[s % len(T.TASKS)], context_len, s)
        assert (time.perf_counter() - t0) / 10 * 1e3 < budget_ms


def test_score_exact_on_constructed_answers():
    ex = T.make_example("niah_single", 1024, 3)
    a = ex.answer.tolist()
    assert T.score("niah_single", ex, a) == 1.0
    assert T.score("niah_single", ex, a + [T.EOS, 17, 18]) == 1.0  # extra tokens ignored
    assert T.score("niah_single", ex, [a[0], a[1] + 1, a[2]]) == pytest.approx(2 / 3)
    assert T.score("niah_single", ex, a[:1]) == pytest.approx(1 / 3)  # missing tokens count wrong
    assert T.score("niah_single", ex, []) == 0.0
    assert T.score("niah_single", ex, [T.EOS] + a) == 0.0  # position-wise, no alignment search
    ex = T.make_example("mq_recall", 1024, 3)
    gen = ex.answer.copy()
    gen[[1, 4, 6]] = T.PAD
    assert T.score("mq_recall", ex, np.asarray(gen)) == pytest.approx(5 / 8)
    with pytest.raises(ValueError, match="does not match"):
        T.score("niah_single", ex, gen)


def test_make_batch_layout_and_mask_convention():
    names, context_len, seed, batch = T.TASKS, 1024, 3, 8
    tokens, mask = T.make_batch(names, context_len, seed, batch)
    max_a = max(T.answer_length(n) for n in names)
    assert tokens.shape == mask.shape == (batch, context_len + max_a + 1)
    assert tokens.dtype == np.int32 and mask.dtype == np.float32
    seen = set()
    for r in range(batch):
        s = seed * batch + r
        name = names[s % len(names)]
        seen.add(name)
        ex = T.make_example(name, context_len, s)
        a = len(ex.answer)
        np.testing.assert_array_equal(tokens[r, :context_len + a + 1], np.concatenate([ex.prompt, ex.answer, [T.EOS]]))
        assert np.all(tokens[r, context_len + a + 1:] == T.PAD)
        # mask[i] = 1 exactly where tokens[i + 1] is an answer token or the EOS
        targets = np.flatnonzero(mask[r]) + 1
        np.testing.assert_array_equal(targets, np.arange(context_len, context_len + a + 1))
        np.testing.assert_array_equal(tokens[r, targets], np.concatenate([ex.answer, [T.EOS]]))
        assert tokens[r, targets[0] - 1] == T.ANSWER and mask[r, -1] == 0
    assert len(seen) == len(names)  # mixed tasks in one batch
    t2, m2 = T.make_batch(names, context_len, seed, batch)
    np.testing.assert_array_equal(tokens, t2)
    np.testing.assert_array_equal(mask, m2)
    t3, _ = T.make_batch(names, context_len, seed + 1, batch)
    assert not np.array_equal(tokens, t3)
    # per-task params set the width
    tokens, mask = T.make_batch("mq_recall", 512, 0, 2, params={"mq_recall": {"n_pairs": 20, "n_queries": 20}})
    assert tokens.shape == (2, 512 + 21) and mask.sum() == 2 * 21


def test_filler_and_build_prompt():
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 5000):
        f = T.make_filler(n, rng)
        assert f.shape == (n,) and f.dtype == np.int32
        assert np.all((f >= T.FILLER_TOKENS.start) & (f < T.FILLER_TOKENS.stop))
    items = [T.needle([20], [150]), T.assignment(21, 151)]
    question = np.array([T.QUERY, 20, T.ANSWER], np.int32)
    prompt, starts = T.build_prompt(items, question, 64, [3, 3], rng)
    assert prompt.shape == (64,) and starts.tolist() == [4, 9]
    np.testing.assert_array_equal(prompt[4:14], np.concatenate(items))
    with pytest.raises(ValueError, match="offsets"):
        T.build_prompt(items, question, 64, [5, 3], rng)
    with pytest.raises(ValueError, match="offsets"):
        T.build_prompt(items, question, 64, [0, 64], rng)


@pytest.mark.parametrize("call, match", [
    (lambda: T.make_example("niah_double", 1024, 0), "unknown task"),
    (lambda: T.make_example("niah_single", 1024, 0, n_pairs=3), "no parameter"),
    (lambda: T.make_example("mq_recall", 100, 0), "too small"),
    (lambda: T.make_example("niah_single", 8, 0), "too small"),
    (lambda: T.make_example("var_tracking", 1024, 0, n_chains=20, n_hops=7), "variables"),
    (lambda: T.make_example("mq_recall", 1024, 0, n_pairs=8, n_queries=9), "n_queries"),
    (lambda: T.make_example("mq_recall", 4096, 0, n_pairs=129), "n_pairs"),
    (lambda: T.make_example("niah_single", 1024, 0, key_len=0), "key_len"),
    (lambda: T.make_example("niah_single", 1024, 0, depth=1.5), "depth"),
    (lambda: T.make_example("local", 1024, 0, window=4), "window"),
    (lambda: T.make_example("niah_multikey", 1024, 0, n_needles=129, key_len=1), "n_needles"),
    (lambda: T.make_example("niah_single", 0, 0), "context_len"),
    (lambda: T.make_example("niah_single", 1024, -1), "seed"),
    (lambda: T.answer_length("nope"), "unknown task"),
    (lambda: T.make_batch([], 1024, 0, 2), "names"),
    (lambda: T.make_batch(["niah_single"], 1024, 0, 2, params={"local": {}}), "not in names"),
    (lambda: T.make_batch(["niah_single"], 1024, T.HELDOUT_SEED, 2), "HELDOUT_SEED"),
])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_token_names():
    assert T.describe([T.BOS, T.KEY_TOKENS.start + 3, T.VALUE_TOKENS.start, T.FILLER_TOKENS.start + 1, T.ANSWER, 12]) \
        == "BOS k3 v0 f1 ANSWER r12"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        T.token_name(T.VOCAB_SIZE)


def test_batch_tasks_names_each_row_of_make_batch():
    names = ("niah_single", "local", "mq_recall")
    tasks = T.batch_tasks(names, 5, 4)
    assert tasks == [names[(5 * 4 + r) % 3] for r in range(4)]
    tokens, _ = T.make_batch(names, 512, 5, 4)
    for r, name in enumerate(tasks):  # the row is that task's example with the row's seed
        np.testing.assert_array_equal(tokens[r, :512], T.make_example(name, 512, 5 * 4 + r).prompt)


def test_recall_drill_restates_needles_and_supervises_their_values():
    assert "recall_drill" in T.DRILLS and "recall_drill" not in T.TASKS
    for seed in range(10):
        for context_len in (512, 2048):
            ex = T.make_example("recall_drill", context_len, seed, n_pairs=10, n_recalls=6, value_len=2)
            assert ex.prompt.shape == (context_len,) and reference_answer(ex.prompt) == ex.answer.tolist()
            m, p = ex.meta, ex.prompt
            needles = []
            for s, n in zip(m["item_starts"], m["item_lengths"]):
                item = p[s:s + n].tolist()
                needles.append((tuple(item[1:item.index(T.VAL)]), tuple(item[item.index(T.VAL) + 1:-1])))
            originals, recalls = needles[:10], needles[10:]
            assert len(recalls) == 6 and len({k[0] for k, _ in originals}) == 10  # first key tokens differ
            assert set(recalls) <= set(originals) and len(set(recalls)) == 6
            assert {len(k) for k, _ in originals} <= {1, 2}
            asked = tuple(p[m["question_start"] + 1:-1].tolist())
            assert asked in [k for k, _ in originals] and asked not in [k for k, _ in recalls]
            # restatements sit after every original (the second half of the filler)
            assert m["item_starts"][10:].min() > m["item_starts"][:10].max()
            # drill targets: exactly the restated value tokens, each equal to its original's value
            want = [s + n - 1 - 2 + j for s, n in zip(m["item_starts"][10:], m["item_lengths"][10:]) for j in range(2)]
            assert m["drill_targets"].tolist() == want
            assert p[m["drill_targets"]].tolist() == [v for _, vals in recalls for v in vals]
    # make_batch supervises the drill targets (mask at the position before each) as well as the answer
    ex = T.make_example("recall_drill", 1024, 0)
    tokens, mask = T.make_batch("recall_drill", 1024, 0, 1)
    np.testing.assert_array_equal(tokens[0, :1024], ex.prompt)
    want = np.concatenate([ex.meta["drill_targets"], np.arange(1024, 1024 + len(ex.answer) + 1)])
    np.testing.assert_array_equal(np.flatnonzero(mask[0]) + 1, want)
    assert mask.sum() == 12 * 3 + 3 + 1
    with pytest.raises(ValueError, match="n_recalls"):
        T.make_example("recall_drill", 1024, 0, n_pairs=4, n_recalls=4)


def test_copy_drill_is_the_recall_drill_with_long_values():
    """copy_drill: recall_drill's generator under its own defaults (few needles, 16 values each); its rows
    supervise every restated value token, most of them plain copies of the token after a previous one."""
    assert "copy_drill" in T.DRILLS and "copy_drill" not in T.TASKS
    for seed in range(5):
        ex = T.make_example("copy_drill", 256, seed)
        assert ex.prompt.shape == (256,) and len(ex.answer) == 16
        assert reference_answer(ex.prompt) == ex.answer.tolist()
        tgt = ex.meta["drill_targets"]
        assert len(tgt) == 3 * 16
        assert np.all((ex.prompt[tgt] >= T.VALUE_TOKENS.start) & (ex.prompt[tgt] < T.VALUE_TOKENS.stop))
    tokens, mask = T.make_batch("copy_drill", 256, 0, 2)
    assert mask.sum() == 2 * (3 * 16 + 16 + 1)
