"""train.tasks: determinism, grammar invariants, answerability by an independent parser, scoring."""
import numpy as np
import pytest

from train import tasks as T


def _parse_answer(prompt: np.ndarray) -> list[int]:
    """Answer the question of a prompt from the grammar alone (no task metadata)."""
    p = prompt.tolist()
    q = len(p) - 1 - p[::-1].index(T.QUERY)
    query = p[q + 1:-1]
    needles, vars_ = [], {}
    i = 0
    while i < q:
        if p[i] in (T.KEY, T.VAR):
            j = p.index(T.SEP, i)
            mid = p.index(T.VAL if p[i] == T.KEY else T.ASSIGN, i)
            k, v = tuple(p[i + 1:mid]), p[mid + 1:j]
            if p[i] == T.KEY:
                needles.append((k, v))
            else:
                vars_[k[0]] = v[0]
            i = j + 1
        else:
            i += 1
    if vars_:
        out, x = [], query[0]
        while x in vars_:
            x = vars_[x]
            out.append(x)
        return out
    keylen = len(needles[0][0])
    if keylen == 1:  # mq_recall: one value per query key
        d = {k[0]: v for k, v in needles}
        return [d[k][0] for k in query]
    return [t for k, v in needles if list(k) == query for t in v]


@pytest.mark.parametrize("name", T.TASKS)
@pytest.mark.parametrize("length", [1000, 4096, 32768])
def test_examples_are_exact_length_grammatical_and_answerable(name, length):
    for seed in range(3):
        e = T.make_example(name, length, seed)
        assert e.prompt.dtype == np.int32 and e.prompt.shape == (length,)
        assert e.prompt[0] == T.BOS and e.prompt[-1] == T.ANSWER
        assert not np.any(e.prompt == T.PAD) and not np.any(e.prompt == T.EOS)
        assert _parse_answer(e.prompt) == e.answer.tolist()
        # outside needles and question, only filler
        body = np.ones(length, bool)
        body[0] = False
        body[-(np.argmax(e.prompt[::-1] == T.QUERY) + 1):] = False
        for s in e.meta["needle_starts"]:
            end = s + np.argmax(e.prompt[s:] == T.SEP) + 1
            body[s:end] = False
        f = e.prompt[body]
        assert np.all((f >= T.FILLER[0]) & (f < T.FILLER[1]))
        if name == "local":
            assert e.meta["needle_starts"][0] >= length - 200 - 8


def test_deterministic_per_seed_and_seeds_differ():
    a, b = T.make_example("mq_recall", 2048, 5), T.make_example("mq_recall", 2048, 5)
    np.testing.assert_array_equal(a.prompt, b.prompt)
    np.testing.assert_array_equal(a.answer, b.answer)
    assert not np.array_equal(a.prompt, T.make_example("mq_recall", 2048, 6).prompt)
    t1, m1 = T.make_batch(T.TASKS, 1024, 3, 4)
    t2, m2 = T.make_batch(T.TASKS, 1024, 3, 4)
    np.testing.assert_array_equal(t1, t2)
    np.testing.assert_array_equal(m1, m2)


def test_depth_is_uniform():
    d = np.array([T.make_example("niah_single", 2048, s).meta["depths"][0] for s in range(400)])
    hist = np.histogram(d, bins=4, range=(0, 1))[0]
    assert hist.min() > 60, hist  # 100 expected per quarter


def test_score_exact_match_per_position():
    e = T.make_example("niah_multivalue", 1024, 0)
    a = e.answer
    assert T.score("niah_multivalue", e, a) == 1.0
    assert T.score("niah_multivalue", e, np.concatenate([a, [1, 2, 3]])) == 1.0  # extra ignored
    wrong = a.copy()
    wrong[1] = (wrong[1] + 1 - T.VALUES[0]) % 128 + T.VALUES[0]
    assert T.score("niah_multivalue", e, wrong) == pytest.approx(1 - 1 / len(a))
    assert T.score("niah_multivalue", e, a[:2]) == pytest.approx(2 / len(a))  # missing count wrong
    with pytest.raises(ValueError):
        T.score("mq_recall", e, a)


def test_make_batch_mask_marks_the_predictions_of_answer_and_eos():
    tokens, mask = T.make_batch(("var_tracking", "mq_recall"), 512, 1, 6)
    for row, m in zip(tokens, mask):
        pos = np.nonzero(m)[0]
        assert row[pos[0]] == T.ANSWER and pos[0] == 511
        assert row[pos[-1] + 1] == T.EOS
        assert np.all(np.diff(pos) == 1)
        assert np.all(row[pos[-1] + 2:] == T.PAD)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown task"):
        T.make_example("nope", 1024, 0)
    with pytest.raises(ValueError, match="too short"):
        T.make_example("mq_recall", 100, 0)
    with pytest.raises(ValueError, match="no parameter"):
        T.make_example("mq_recall", 1024, 0, hops=2)
    with pytest.raises(ValueError, match="n_queries"):
        T.make_example("mq_recall", 1024, 0, n_pairs=4, n_queries=8)
