"""Synthetic long-context tasks (RULER-style) over a small vocabulary: the trained miniature's curriculum
and its evaluation suite.

**Vocabulary** (`VOCAB_SIZE` = 512 ids):

=========  =========  ====================================================================
ids        name       meaning
=========  =========  ====================================================================
0          PAD        right padding of batches (never inside a prompt)
1          BOS        first token of every prompt
2          EOS        ends an answer (training targets only)
3          KEY        starts a needle / pair: ``KEY <key tokens> VAL <value tokens> SEP``
4          VAL        separates a needle's key from its value
5          QUERY      starts the question at the end of the prompt
6          ANSWER     last prompt token; the answer follows it
7          SEP        ends a needle or an assignment
8          VAR        starts an assignment: ``VAR <name> ASSIGN <name or value> SEP``
9          ASSIGN     separates an assignment's name from its right-hand side
10-15      (reserved)
16-143     keys       key tokens, and variable names in ``var_tracking`` (`KEYS`)
144-271    values     value tokens (`VALUES`)
272-511    filler     the haystack: uniform random filler tokens (`FILLER`)
=========  =========  ====================================================================

A prompt is ``BOS <haystack with needles> <question>``; the haystack is filler with the task's needles
inserted at independent uniform depths (never overlapping, never inside the question). The question is
``QUERY <query tokens> ANSWER`` and the model continues with the answer tokens (then EOS). Every answer
token needs one needle that can be anywhere in the prompt: the model must look it up.

**Tasks** (`TASKS`; defaults in parentheses, override with ``make_example(..., **params)``):

* ``niah_single``: one needle ``KEY k1 k2 VAL v1 v2 v3 SEP`` (``key_len=2``, ``value_len=3``); question
  ``QUERY k1 k2 ANSWER``; answer ``v1 v2 v3``.
* ``niah_multikey``: ``n_needles=4`` needles with distinct keys (the others are distractors); the
  question names one of them.
* ``niah_multivalue``: ``n_values=4`` needles with the same key, each with its own ``value_len=2`` values;
  the answer is all their values in order of appearance.
* ``mq_recall``: ``n_pairs=32`` pairs ``KEY k VAL v SEP`` (single-token keys, all distinct); question
  ``QUERY k_1 ... k_M ANSWER`` with ``n_queries=8`` distinct keys of them; answer ``v_1 ... v_M``.
* ``var_tracking``: ``n_chains=2`` chains of ``hops=3`` assignments: ``VAR x1 ASSIGN v SEP`` (v a value),
  ``VAR x2 ASSIGN x1 SEP``, ``VAR x3 ASSIGN x2 SEP``, in that order in the prompt (other chains are
  distractors); question ``QUERY x3 ANSWER``; the answer is the hop sequence ``x2 x1 v``.
* ``local``: like ``niah_single`` but the needle sits within the last ``local_span=192`` tokens before the
  question, so only recent context is needed (LSA must not hurt it).

API: `make_example(name, context_len, seed, **params) -> Example` (deterministic per arguments; the prompt
has exactly ``context_len`` tokens), `score(name, example, generated) -> float` (exact match per answer
position, averaged), `make_batch(names, context_len, seed, batch) -> (tokens, loss_mask)` for training.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

VOCAB_SIZE = 512
PAD, BOS, EOS, KEY, VAL, QUERY, ANSWER, SEP, VAR, ASSIGN = range(10)
KEYS = (16, 144)      # [lo, hi)
VALUES = (144, 272)
FILLER = (272, 512)
TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "mq_recall", "var_tracking", "local")
DEFAULTS = {
    "niah_single": dict(key_len=2, value_len=3),
    "niah_multikey": dict(key_len=2, value_len=3, n_needles=4),
    "niah_multivalue": dict(key_len=2, value_len=2, n_values=4),
    "mq_recall": dict(n_pairs=32, n_queries=8),
    "var_tracking": dict(n_chains=2, hops=3),
    "local": dict(key_len=2, value_len=3, local_span=192),
}


@dataclass(frozen=True)
class Example:
    task: str
    prompt: np.ndarray      # int32 [T], BOS ... ANSWER
    answer: np.ndarray      # int32 [A], without EOS
    meta: dict = field(default_factory=dict)   # needle starts / depths, params


def _rng(name: str, context_len: int, seed: int, params: dict) -> np.random.Generator:
    tag = zlib.crc32(repr((name, sorted(params.items()))).encode())
    return np.random.default_rng(np.random.SeedSequence([tag, context_len, seed & 0xFFFFFFFF, seed >> 32]))


def _distinct(rng, lo_hi, n: int, width: int = 1) -> np.ndarray:
    """n distinct tuples of `width` tokens from [lo, hi) -> int32 [n, width]."""
    lo, hi = lo_hi
    space = (hi - lo) ** width
    if n > space:
        raise ValueError(f"cannot draw {n} distinct {width}-token keys from {hi - lo} tokens")
    codes = rng.choice(space, size=n, replace=False)
    digits = [(codes // (hi - lo) ** i) % (hi - lo) for i in reversed(range(width))]
    return (np.stack(digits, axis=1) + lo).astype(np.int32)


def _needle(key, value, open_tok=KEY, mid_tok=VAL) -> np.ndarray:
    return np.concatenate([[open_tok], key, [mid_tok], value, [SEP]]).astype(np.int32)


def _place(rng, body_len: int, needles: list[np.ndarray], lo: int = 0):
    """Insert `needles` (in this order) into `body_len` filler tokens at uniform depths >= `lo` -> (body,
    start of each needle)."""
    total = sum(len(n) for n in needles)
    free = body_len - total
    if free < lo:
        raise ValueError(f"context too short: {total} needle tokens do not fit in a {body_len}-token haystack")
    slots = np.sort(rng.integers(lo, free + 1, size=len(needles)))
    filler = rng.integers(*FILLER, size=free).astype(np.int32)
    parts, starts, prev, shift = [], [], 0, 0
    for s, n in zip(slots, needles):
        parts.append(filler[prev:s])
        starts.append(int(s + shift))
        parts.append(n)
        shift += len(n)
        prev = s
    parts.append(filler[prev:])
    return np.concatenate(parts).astype(np.int32), starts


def _assemble(name, context_len, rng, needles, question, answer, params, lo_from_end=None, order=None):
    body_len = context_len - 1 - len(question)
    lo = 0 if lo_from_end is None else max(0, body_len - lo_from_end)
    body, starts = _place(rng, body_len, needles, lo)
    prompt = np.concatenate([[BOS], body, question]).astype(np.int32)
    starts = [s + 1 for s in starts]
    meta = {"needle_starts": starts, "depths": [s / context_len for s in starts], "params": params}
    if order is not None:
        meta["order"] = order
    return Example(name, prompt, np.asarray(answer, np.int32), meta)


def make_example(name: str, context_len: int, seed: int, **params) -> Example:
    """One instance of task `name` whose prompt has exactly `context_len` tokens (see the module doc)."""
    if name not in DEFAULTS:
        raise ValueError(f"unknown task {name!r}; choose one of {TASKS}")
    unknown = set(params) - set(DEFAULTS[name])
    if unknown:
        raise ValueError(f"task {name!r} has no parameter(s) {sorted(unknown)}; it takes {sorted(DEFAULTS[name])}")
    p = {**DEFAULTS[name], **params}
    if any(not isinstance(v, (int, np.integer)) or v <= 0 for v in p.values()):
        raise ValueError(f"task parameters must be positive ints, got {p}")
    if not isinstance(context_len, (int, np.integer)) or context_len <= 0:
        raise ValueError(f"context_len must be a positive int, got {context_len!r}")
    rng = _rng(name, int(context_len), int(seed), p)
    if name in ("niah_single", "local", "niah_multikey"):
        n = p.get("n_needles", 1)
        keys = _distinct(rng, KEYS, n, p["key_len"])
        vals = rng.integers(*VALUES, size=(n, p["value_len"])).astype(np.int32)
        target = int(rng.integers(n))
        needles = [_needle(k, v) for k, v in zip(keys, vals)]
        question = np.concatenate([[QUERY], keys[target], [ANSWER]])
        span = p["local_span"] if name == "local" else None
        ex = _assemble(name, context_len, rng, needles, question, vals[target], p, lo_from_end=span)
        ex.meta["target"] = target
        return ex
    if name == "niah_multivalue":
        key = _distinct(rng, KEYS, 1, p["key_len"])[0]
        vals = rng.integers(*VALUES, size=(p["n_values"], p["value_len"])).astype(np.int32)
        needles = [_needle(key, v) for v in vals]
        return _assemble(name, context_len, rng, needles, np.concatenate([[QUERY], key, [ANSWER]]),
                         vals.reshape(-1), p)
    if name == "mq_recall":
        if p["n_queries"] > p["n_pairs"]:
            raise ValueError(f"n_queries={p['n_queries']} must be <= n_pairs={p['n_pairs']}")
        keys = _distinct(rng, KEYS, p["n_pairs"])[:, 0]
        vals = rng.integers(*VALUES, size=p["n_pairs"]).astype(np.int32)
        q = rng.choice(p["n_pairs"], size=p["n_queries"], replace=False)
        needles = [_needle([k], [v]) for k, v in zip(keys, vals)]
        return _assemble(name, context_len, rng, needles, np.concatenate([[QUERY], keys[q], [ANSWER]]), vals[q], p,
                         order=q.tolist())
    # var_tracking: chain c is names[c, 0..hops-1]; x1 = value, x_{j+1} = x_j; assignments in hop order
    n_c, hops = p["n_chains"], p["hops"]
    names = _distinct(rng, KEYS, n_c * hops)[:, 0].reshape(n_c, hops)
    roots = rng.integers(*VALUES, size=n_c).astype(np.int32)
    owner = rng.permutation(np.repeat(np.arange(n_c), hops))  # which chain each depth-ordered slot belongs to
    needles, hop_of = [], np.zeros(n_c, int)
    for c in owner:
        j = hop_of[c]
        rhs = roots[c] if j == 0 else names[c, j - 1]
        needles.append(_needle([names[c, j]], [rhs], VAR, ASSIGN))
        hop_of[c] += 1
    target = int(rng.integers(n_c))
    answer = np.concatenate([names[target, :-1][::-1], [roots[target]]])
    ex = _assemble(name, context_len, rng, needles, np.asarray([QUERY, names[target, -1], ANSWER]), answer, p)
    ex.meta["target"] = target
    return ex


def score(name: str, example: Example, generated) -> float:
    """Exact match per answer position, averaged: missing tokens count wrong, extra tokens are ignored."""
    if name != example.task:
        raise ValueError(f"example is a {example.task!r} instance, not {name!r}")
    gen = np.asarray(generated, np.int64).reshape(-1)[: len(example.answer)]
    hits = np.sum(gen == example.answer[: len(gen)])
    return float(hits) / len(example.answer)


def make_batch(names, context_len: int, seed: int, batch: int):
    """A training batch of mixed tasks (task of row i drawn by `seed`, default parameters).

    Returns ``tokens`` int32 [batch, L] = prompt ⧺ answer ⧺ EOS, right-padded with PAD to
    ``L = context_len + max answer length + 1``, and ``loss_mask`` float32 [batch, L] with
    ``loss_mask[b, i] = 1`` iff ``tokens[b, i + 1]`` is an answer token or the EOS, i.e. the positions whose
    next-token prediction is scored (from the ANSWER token to the last answer token)."""
    names = tuple(names)
    for n in names:
        if n not in DEFAULTS:
            raise ValueError(f"unknown task {n!r}; choose one of {TASKS}")
    rng = np.random.default_rng(np.random.SeedSequence([0x7A5C, seed & 0xFFFFFFFF, seed >> 32]))
    picks = rng.integers(len(names), size=batch)
    seeds = rng.integers(0, 2**62, size=batch)
    exs = [make_example(names[k], context_len, int(s)) for k, s in zip(picks, seeds)]
    width = context_len + max(len(e.answer) for e in exs) + 1
    tokens = np.full((batch, width), PAD, np.int32)
    mask = np.zeros((batch, width), np.float32)
    for b, e in enumerate(exs):
        a = len(e.answer)
        tokens[b, :context_len] = e.prompt
        tokens[b, context_len:context_len + a] = e.answer
        tokens[b, context_len + a] = EOS
        mask[b, context_len - 1:context_len + a] = 1.0
    return tokens, mask
