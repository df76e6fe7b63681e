"""Synthetic long-context task suite (RULER-style) over a 512-token vocabulary: needles, associative
recall, variable tracking and a local control task, seeded and exactly scorable.

Vocabulary (``VOCAB_SIZE = 512``)
---------------------------------
=============  ==========  =====================================================================
range          constant    meaning
=============  ==========  =====================================================================
0              ``PAD``     right padding in :func:`make_batch` (never inside a prompt)
1              ``BOS``     first token of every prompt
2              ``EOS``     ends the answer (training target after the last answer token)
3              ``KEY``     starts a needle / pair: ``KEY <key tokens> VAL <value tokens> SEP``
4              ``VAL``     separates a needle's key tokens from its value tokens
5              ``QUERY``   starts the question (exactly once per prompt, right after the haystack)
6              ``ANSWER``  last prompt token; the answer is generated after it
7              ``SEP``     ends a needle, pair or assignment
8              ``VAR``     starts an assignment ``VAR x ASSIGN y SEP``; also marks a variable question
9              ``ASSIGN``  between an assignment's variable and its right-hand side
10-15                      reserved (never emitted)
16-143         ``KEY_TOKENS``     keys of needles / pairs, and variable names
144-271        ``VALUE_TOKENS``   values (needle values, pair values, the literals variables end in)
272-511        ``FILLER_TOKENS``  filler only
=============  ==========  =====================================================================

``SPECIAL_TOKENS``, ``KEY_TOKENS``, ``VALUE_TOKENS`` and ``FILLER_TOKENS`` are ``range`` objects
(``tok in KEY_TOKENS``; ``.start`` / ``.stop`` for NumPy comparisons).

Prompt grammar
--------------
::

    prompt   := BOS haystack question                       (exactly context_len tokens)
    haystack := filler with items inserted at seeded offsets (items never overlap or nest)
    item     := KEY key+ VAL value+ SEP                     (needle / pair)
              | VAR var ASSIGN (var | value) SEP            (assignment; var is a KEY_TOKENS token)
    question := QUERY key+ ANSWER                           (needle tasks, mq_recall)
              | QUERY VAR var ANSWER                        (var_tracking)
    target   := answer EOS                                  (what the model generates after ANSWER)

Filler is a sequence of *words* from a fixed lexicon (``N_FILLER_WORDS`` words of 1-4 filler tokens,
built once from ``FILLER_SEED``), cut wherever an item is inserted; it gives the haystack local
structure but carries no information about any answer. Filler never contains a special, key or value
token, so every non-filler token of the haystack belongs to an item. How a question is read: when some
needle's key tuple equals the question's key tokens as a whole, the answer is the values of every such
needle in order of appearance (needle tasks); otherwise each question token is a single-token key stored
in exactly one pair and the answer is their values in question order (``mq_recall``); ``QUERY VAR x``
asks for the hop sequence from ``x`` down to a value (``var_tracking``).

Tasks (``TASKS``; defaults in ``DEFAULT_PARAMS``)
-------------------------------------------------
``niah_single`` (``key_len=2, value_len=3, depth=None``)
    one needle ``KEY k1 k2 VAL v1 v2 v3 SEP``; question ``QUERY k1 k2 ANSWER``; answer ``v1 v2 v3``.
``niah_multikey`` (``n_needles=4, key_len=2, value_len=3, depth=None``)
    ``n_needles`` needles with pairwise different key tuples; the question asks for one of them (chosen
    by the seed); the others are distractors. Answer: that needle's values.
``niah_multivalue`` (``n_values=4, key_len=2, value_len=3``)
    ``n_values`` needles with the same key tuple and independent values; answer: all their values
    concatenated in order of appearance (``n_values * value_len`` tokens).
``mq_recall`` (``n_pairs=32, n_queries=8``)
    ``n_pairs`` pairs ``KEY k VAL v SEP`` (single tokens; keys pairwise different, values pairwise
    different) scattered uniformly; question ``QUERY k_a k_b ... ANSWER`` lists ``n_queries`` different
    keys in a seeded order; answer: their values in that order. Each answer token lives in a different
    pair, so the tokens a ``tau``-step window needs span several distant places.
``var_tracking`` (``n_chains=3, n_hops=3``)
    ``n_chains`` chains of single-assignment statements; chain ``c`` defines ``x1 = v`` (``v`` a value
    token), then ``x2 = x1``, ..., ``x_n = x_{n-1}`` (``n = n_hops``), each as ``VAR x ASSIGN y SEP``.
    All variable names are different; a chain's statements appear in definition order, the chains are
    interleaved at random. Question ``QUERY VAR x_n ANSWER`` for one chain; answer: the hop sequence
    ``x_{n-1} ... x1 v`` (``n_hops`` tokens): answer token ``i`` is the right-hand side of the statement
    assigning answer token ``i - 1`` (the queried variable for ``i = 0``): one distant lookup each.
    The other chains are distractors.
``local`` (``key_len=2, value_len=3, window=200``)
    ``niah_single`` with the needle starting at most ``window`` tokens before ``QUERY`` (needs only the
    recent context: sparse attention must not hurt it).

Training-only drill (``DRILLS``; not in ``TASKS``, never evaluated)
--------------------------------------------------------------------
``recall_drill`` (``n_pairs=16, n_recalls=12, value_len=3``)
    ``n_pairs`` needles (keys of 1 or 2 key tokens, first key tokens pairwise different) in the first half of
    the filler, then ``n_recalls`` of them restated word for word in the second half, then a question for a
    needle that is not restated. Every value token of a restatement is a copy from its original, so
    :func:`make_batch` supervises them too (``meta["drill_targets"]``, their prompt positions): about 36
    supervised lookups per row instead of one answer, the associative-recall signal the needle tasks give
    once per prompt.
``copy_drill`` (``n_pairs=4, n_recalls=3, value_len=16``)
    ``recall_drill``'s grammar and generator with few needles and long values: after each restated
    ``KEY k VAL``, 15 of the 16 supervised value tokens are plain copies of the token after the previous
    occurrence of the current one, at a distance that differs row to row. It exists to get a model from
    scratch past the plateau before it copies anything at all (an induction head): on ``recall_drill``
    alone (a few copies per needle) neither the ``mini`` backbone nor a textbook two-layer transformer
    left chance in 1,500 steps, while with half the rows a randomly placed repeated passage the latter
    did by step ~550 (issue 9, ``benchmarks/results/ablate-recall-*``).

Every answer token is a copy of exactly one haystack token: ``meta["answer_sources"][i]`` is its prompt
position. ``depth`` (``niah_single``, ``niah_multikey``) pins the queried needle at that fraction of
the filler (0 = right after BOS, 1 = right before the question) instead of a uniform draw.

Metadata (``Example.meta``)
---------------------------
``params``          every parameter, defaults filled in
``item_starts``     int64 ``[n_items]``, prompt position of each item's first token, in order of appearance
``item_lengths``    int64 ``[n_items]``
``target_items``    int64 ``[n_targets]``, indices into ``item_starts`` of the items holding the answer,
                    in answer order
``answer_sources``  int64 ``[A]``, the prompt position each answer token is copied from
``question_start``  prompt position of ``QUERY``
``filler_len``      number of filler tokens
``target_depths``   float ``[n_targets]``, each target item's depth: filler tokens before it / ``filler_len``
                    (uniform on [0, 1], pooled over targets, for every task but ``local`` unless
                    ``depth`` pins it)
``depth``           ``target_depths[0]`` (the item of the first answer token)
``drill_targets``   drills only: int64 prompt positions of the restated value tokens (supervised)

Public API
----------
``make_example(name, context_len, seed, **params) -> Example``; ``score(name, example, generated) -> float``;
``make_batch(names, context_len, seed, batch, params=None) -> (tokens, loss_mask)``, ``batch_tasks`` (its rows'
tasks);
``answer_length(name, **params)``; ``token_name(tok)`` / ``describe(tokens)`` (``k3``, ``v17``, ``QUERY``, ...);
building blocks for new tasks: ``needle``, ``assignment``,
``make_filler``, ``filler_length``, ``build_prompt``; constants ``TASKS``, ``DEFAULT_PARAMS``,
``VOCAB_SIZE``, the special tokens, the token ranges, ``HELDOUT_SEED``.

Determinism and seeds
---------------------
An example is a pure function of ``(name, context_len, seed, params)``; the random stream depends on
``name`` and ``seed`` only, so one seed at two context lengths or depths shares its keys and values.
:func:`make_batch` uses example seeds ``seed * batch + row``, all below ``HELDOUT_SEED``; draw held-out
evaluation examples with seeds ``>= HELDOUT_SEED`` so that training never saw them.

Training batches (``make_batch``)
---------------------------------
Row ``r`` is ``prompt ⧺ answer ⧺ EOS`` right-padded with ``PAD`` to width ``context_len + max_A + 1``
(``max_A`` = the longest answer among the batch's tasks, from :func:`answer_length`). The task of row
``r`` is ``names[(seed * batch + r) % len(names)]`` (names cycle across rows and consecutive batches).
``loss_mask[r, i] = 1`` exactly when ``tokens[r, i + 1]`` is an answer token or the answer's ``EOS``,
i.e. the positions ``context_len - 1 .. context_len - 1 + A`` (the first one holds ``ANSWER``), or (drill
rows) a ``drill_targets`` token, so the
next-token loss is ``sum_i mask[i] * -log p(tokens[i + 1] | tokens[:i + 1]) / sum(mask)`` with logits
at positions ``[:-1]`` against targets ``[1:]`` and ``mask[:-1]``; the last column of the mask is
always 0.

Writing a new task against a trained checkpoint
-----------------------------------------------
Build items with the item grammar above (e.g. ``needle(keys, values)``), a question ``QUERY ... ANSWER``,
and call :func:`build_prompt` with nondecreasing filler offsets; generate greedily after the prompt and
stop at ``EOS``. Questions whose form the model never saw in training (e.g. asking a needle's key from
its value) are out of distribution.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import numpy as np

VOCAB_SIZE = 512
_SPECIAL_NAMES = ("PAD", "BOS", "EOS", "KEY", "VAL", "QUERY", "ANSWER", "SEP", "VAR", "ASSIGN")  # token_name
PAD, BOS, EOS, KEY, VAL, QUERY, ANSWER, SEP, VAR, ASSIGN = range(len(_SPECIAL_NAMES))
SPECIAL_TOKENS = range(0, 16)
KEY_TOKENS = range(16, 144)
VALUE_TOKENS = range(144, 272)
FILLER_TOKENS = range(272, 512)

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "mq_recall", "var_tracking", "local")
DRILLS = ("recall_drill", "copy_drill")   # training-only: not part of the evaluated suite
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "niah_single": {"key_len": 2, "value_len": 3, "depth": None},
    "niah_multikey": {"n_needles": 4, "key_len": 2, "value_len": 3, "depth": None},
    "niah_multivalue": {"n_values": 4, "key_len": 2, "value_len": 3},
    "mq_recall": {"n_pairs": 32, "n_queries": 8},
    "var_tracking": {"n_chains": 3, "n_hops": 3},
    "local": {"key_len": 2, "value_len": 3, "window": 200},
    "recall_drill": {"n_pairs": 16, "n_recalls": 12, "value_len": 3},
    "copy_drill": {"n_pairs": 4, "n_recalls": 3, "value_len": 16},
}
HELDOUT_SEED = 1 << 40

FILLER_SEED = 20260512
N_FILLER_WORDS = 1024
_lex_rng = np.random.default_rng(FILLER_SEED)
_WORD_LEN = _lex_rng.integers(1, 5, N_FILLER_WORDS)
_WORD_START = np.cumsum(_WORD_LEN) - _WORD_LEN
_WORD_TOKENS = _lex_rng.integers(FILLER_TOKENS.start, FILLER_TOKENS.stop, int(_WORD_LEN.sum())).astype(np.int32)
del _lex_rng


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One task instance: ``prompt`` int32 ``[context_len]`` (BOS ... ANSWER), ``answer`` int32 ``[A]``
    (no EOS), ``meta`` as in the module docstring."""
    task: str
    prompt: np.ndarray
    answer: np.ndarray
    meta: dict


def make_filler(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` int32 filler tokens: random words of the fixed lexicon, concatenated and cut to ``n``."""
    if n < 0:
        raise ValueError(f"filler length must be >= 0, got {n}")
    ids = rng.integers(0, N_FILLER_WORDS, n // 2 + 16)  # mean word length 2.5: n // 2 words nearly always do
    while _WORD_LEN[ids].sum() < n:
        ids = np.concatenate([ids, rng.integers(0, N_FILLER_WORDS, n // 2 + 16)])
    ends = np.cumsum(_WORD_LEN[ids])
    k = int(np.searchsorted(ends, n)) + 1  # the first k words reach n tokens
    ids, ends = ids[:k], ends[:k]
    lens = _WORD_LEN[ids]
    within = np.arange(int(ends[-1])) - np.repeat(ends - lens, lens)
    return _WORD_TOKENS[np.repeat(_WORD_START[ids], lens) + within][:n]


def needle(keys, values) -> np.ndarray:
    """``KEY keys.. VAL values.. SEP`` as int32."""
    return np.concatenate([[KEY], keys, [VAL], values, [SEP]]).astype(np.int32)


def assignment(var: int, rhs: int) -> np.ndarray:
    """``VAR var ASSIGN rhs SEP`` as int32."""
    return np.array([VAR, var, ASSIGN, rhs, SEP], np.int32)


def build_prompt(items: list[np.ndarray], question: np.ndarray, context_len: int, offsets,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``BOS haystack question`` of exactly ``context_len`` tokens.

    ``items`` in order of appearance; ``offsets[i]`` (nondecreasing, in ``[0, filler_len]``) is the number
    of filler tokens before item ``i``, where ``filler_len = context_len - 1 - len(question) - sum(len(items))``
    (see :func:`filler_length`). Returns ``(prompt int32 [context_len], item_starts int64 [n_items])``.
    """
    lens = np.array([len(x) for x in items], np.int64)
    n_fill = filler_length(context_len, int(lens.sum()), len(question))
    offsets = np.asarray(offsets, np.int64)
    if offsets.shape != lens.shape or (offsets.size and (offsets[0] < 0 or offsets[-1] > n_fill
                                                         or np.any(np.diff(offsets) < 0))):
        raise ValueError(f"offsets must be {len(items)} nondecreasing ints in [0, {n_fill}], got {offsets}")
    hay_len = n_fill + int(lens.sum())
    prompt = np.empty(context_len, np.int32)
    prompt[0] = BOS
    prompt[1 + hay_len:] = question
    starts = 1 + offsets + np.cumsum(lens) - lens
    is_item = np.zeros(context_len, bool)
    if items:
        ends = np.cumsum(lens)
        pos = np.repeat(starts, lens) + np.arange(int(ends[-1])) - np.repeat(ends - lens, lens)
        prompt[pos] = np.concatenate(items)
        is_item[pos] = True
    is_item[0] = True
    is_item[1 + hay_len:] = True
    prompt[~is_item] = make_filler(n_fill, rng)
    return prompt, starts


def filler_length(context_len: int, items_len: int, question_len: int) -> int:
    """Filler tokens left for a prompt of ``context_len`` (ValueError when negative)."""
    n_fill = context_len - 1 - question_len - items_len
    if n_fill < 0:
        raise ValueError(f"context_len={context_len} is too small: BOS + items ({items_len}) + question "
                         f"({question_len}) need {context_len - n_fill}")
    return n_fill


def _resolve(name: str, params: dict) -> dict:
    if name not in DEFAULT_PARAMS:
        raise ValueError(f"unknown task {name!r}; TASKS = {TASKS}")
    unknown = set(params) - set(DEFAULT_PARAMS[name])
    if unknown:
        raise ValueError(f"task {name!r} has no parameter(s) {sorted(unknown)}; "
                         f"it takes {sorted(DEFAULT_PARAMS[name])}")
    p = {**DEFAULT_PARAMS[name], **params}
    for k, v in p.items():
        if k == "depth":
            if v is not None and not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise ValueError(f"{name}: depth must be None or a number in [0, 1], got {v!r}")
        elif not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: {k} must be a positive int, got {v!r}")
    n_keys = len(KEY_TOKENS)
    if name == "niah_multikey" and p["n_needles"] > n_keys ** p["key_len"]:
        raise ValueError(f"{name}: n_needles={p['n_needles']} exceeds the {n_keys}**key_len distinct keys")
    if name == "mq_recall":
        if p["n_pairs"] > min(n_keys, len(VALUE_TOKENS)):
            raise ValueError(f"{name}: n_pairs={p['n_pairs']} exceeds the {n_keys} distinct keys")
        if p["n_queries"] > p["n_pairs"]:
            raise ValueError(f"{name}: n_queries={p['n_queries']} exceeds n_pairs={p['n_pairs']}")
    if name == "var_tracking":
        if p["n_chains"] * p["n_hops"] > n_keys:
            raise ValueError(f"{name}: n_chains * n_hops = {p['n_chains'] * p['n_hops']} variables exceed "
                             f"the {n_keys} names")
        if p["n_chains"] > len(VALUE_TOKENS):
            raise ValueError(f"{name}: n_chains={p['n_chains']} exceeds the {len(VALUE_TOKENS)} values")
    if name in DRILLS:
        if p["n_pairs"] > n_keys:
            raise ValueError(f"{name}: n_pairs={p['n_pairs']} exceeds the {n_keys} distinct first key tokens")
        if p["n_recalls"] >= p["n_pairs"]:
            raise ValueError(f"{name}: n_recalls={p['n_recalls']} must be < n_pairs={p['n_pairs']} (the question "
                             "asks a pair that is not restated)")
    if name == "local" and p["window"] < p["key_len"] + p["value_len"] + 3:
        raise ValueError(f"local: window={p['window']} is shorter than the needle "
                         f"({p['key_len'] + p['value_len'] + 3} tokens)")
    return p


def answer_length(name: str, **params) -> int:
    """Answer tokens (without EOS) of task ``name`` with ``params``: fixed per task and parameters."""
    p = _resolve(name, params)
    if name == "niah_multivalue":
        return p["n_values"] * p["value_len"]
    if name == "mq_recall":
        return p["n_queries"]
    if name == "var_tracking":
        return p["n_hops"]
    return p["value_len"]


def _keys(rng, n):
    return rng.integers(KEY_TOKENS.start, KEY_TOKENS.stop, n).astype(np.int32)


def _values(rng, n):
    return rng.integers(VALUE_TOKENS.start, VALUE_TOKENS.stop, n).astype(np.int32)


def _distinct(rng, tokens: range, n: int) -> np.ndarray:
    """``n`` pairwise different tokens of ``tokens`` (int32, a seeded permutation's first ``n``)."""
    return (rng.permutation(len(tokens))[:n] + tokens.start).astype(np.int32)


def _offsets(rng, n_fill, n, pinned: int | None = None, depth: float | None = None) -> np.ndarray:
    """``n`` iid uniform filler offsets in ``[0, n_fill]``; item ``pinned`` at ``depth`` when given."""
    off = rng.integers(0, n_fill + 1, n)
    if depth is not None:
        off[pinned] = int(round(depth * n_fill))
    return off


def _needle_items(name, p, context_len, rng):
    """Needle tasks: items (appearance order), question, answer, target item indices, value offsets."""
    kl, vl = p["key_len"], p["value_len"]
    n = p.get("n_needles", p.get("n_values", 1))
    if name == "niah_multikey":
        keys = _keys(rng, (n, kl))
        while len({tuple(k) for k in keys}) < n:  # redraw until the key tuples are pairwise different
            keys = _keys(rng, (n, kl))
    else:
        keys = np.broadcast_to(_keys(rng, (1, kl)), (n, kl))
    values = _values(rng, (n, vl))
    query = int(rng.integers(0, n)) if name == "niah_multikey" else 0
    question = np.concatenate([[QUERY], keys[query], [ANSWER]]).astype(np.int32)
    n_fill = filler_length(context_len, n * (kl + vl + 3), len(question))
    if name == "local":
        # needle start within `window` tokens of QUERY: start >= QUERY - window, i.e. offset >= n_fill + len - window
        lo = max(0, n_fill + kl + vl + 3 - p["window"])
        off = rng.integers(lo, n_fill + 1, 1)
    else:
        off = _offsets(rng, n_fill, n, query, p.get("depth"))
    order = np.argsort(off, kind="stable")  # appearance order of needles
    items = [needle(keys[i], values[i]) for i in order]
    if name == "niah_multivalue":
        targets = np.arange(n)
    else:
        targets = np.flatnonzero(order == query)
    answer = np.concatenate([items[t][kl + 2:kl + 2 + vl] for t in targets])
    src_within = np.tile(np.arange(kl + 2, kl + 2 + vl), len(targets))
    return items, question, answer, targets, np.repeat(np.arange(len(targets)), vl), src_within, off[order]


def _mq_items(p, context_len, rng):
    n, m = p["n_pairs"], p["n_queries"]
    keys, values = _distinct(rng, KEY_TOKENS, n), _distinct(rng, VALUE_TOKENS, n)
    asked = rng.permutation(n)[:m]  # pairs appear in index order; `keys` is already a random permutation
    question = np.concatenate([[QUERY], keys[asked], [ANSWER]]).astype(np.int32)
    n_fill = filler_length(context_len, 5 * n, len(question))
    off = np.sort(_offsets(rng, n_fill, n))
    items = [needle(keys[i:i + 1], values[i:i + 1]) for i in range(n)]
    return items, question, values[asked], asked, np.arange(m), np.full(m, 3), off


def _drill_items(p, context_len, rng):
    """recall_drill: originals in the first half of the filler, restatements in the second half."""
    n, m, vl = p["n_pairs"], p["n_recalls"], p["value_len"]
    firsts = _distinct(rng, KEY_TOKENS, n)
    keys = [np.array([f] if rng.integers(0, 2) else [f, _keys(rng, 1)[0]], np.int32) for f in firsts]
    values = _values(rng, (n, vl))
    order = rng.permutation(n)
    asked, recalled = int(order[0]), order[1:m + 1]
    question = np.concatenate([[QUERY], keys[asked], [ANSWER]]).astype(np.int32)
    items = [needle(keys[i], values[i]) for i in list(range(n)) + list(recalled)]
    n_fill = filler_length(context_len, sum(len(x) for x in items), len(question))
    half = n_fill // 2
    off = np.concatenate([np.sort(rng.integers(0, half + 1, n)), np.sort(rng.integers(half, n_fill + 1, m))])
    return items, question, values[asked], np.array([asked]), np.zeros(vl, np.int64), \
        len(keys[asked]) + 2 + np.arange(vl), off


def _var_items(p, context_len, rng):
    c, h = p["n_chains"], p["n_hops"]
    names, lits = _distinct(rng, KEY_TOKENS, c * h).reshape(c, h), _distinct(rng, VALUE_TOKENS, c)
    query = int(rng.integers(0, c))
    chain_of_slot = rng.permutation(np.repeat(np.arange(c), h))  # interleaving of the chains
    question = np.array([QUERY, VAR, names[query, -1], ANSWER], np.int32)
    n_fill = filler_length(context_len, 5 * c * h, len(question))
    off = np.sort(_offsets(rng, n_fill, c * h))
    items, slot_of = [], np.empty((c, h), np.int64)  # slot_of[c, j]: item index of chain c's statement j
    seen = np.zeros(c, np.int64)
    for s, ch in enumerate(chain_of_slot):
        j = seen[ch]
        seen[ch] += 1
        items.append(assignment(names[ch, j], lits[ch] if j == 0 else names[ch, j - 1]))
        slot_of[ch, j] = s
    answer = np.concatenate([names[query, :-1][::-1], lits[query:query + 1]]).astype(np.int32)
    targets = slot_of[query, ::-1]  # statement n assigns answer[0], ..., statement 1 assigns v
    return items, question, answer, targets, np.arange(h), np.full(h, 3), off


def make_example(name: str, context_len: int, seed: int, **params) -> Example:
    """Task ``name`` at exactly ``context_len`` prompt tokens; deterministic in all arguments."""
    p = _resolve(name, params)
    if not isinstance(context_len, (int, np.integer)) or isinstance(context_len, bool) or context_len < 1:
        raise ValueError(f"context_len must be a positive int, got {context_len!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
    if name == "mq_recall":
        parts = _mq_items(p, context_len, rng)
    elif name == "var_tracking":
        parts = _var_items(p, context_len, rng)
    elif name in DRILLS:
        parts = _drill_items(p, context_len, rng)
    else:
        parts = _needle_items(name, p, context_len, rng)
    items, question, answer, targets, src_item, src_within, off = parts
    prompt, starts = build_prompt(items, question, context_len, off, rng)
    lens = np.array([len(x) for x in items], np.int64)
    n_fill = context_len - 1 - len(question) - int(lens.sum())
    depths = off[targets] / max(n_fill, 1)
    meta = {
        "params": p,
        "item_starts": starts,
        "item_lengths": lens,
        "target_items": np.asarray(targets, np.int64),
        "answer_sources": starts[np.asarray(targets)[src_item]] + src_within,
        "question_start": context_len - len(question),
        "filler_len": n_fill,
        "target_depths": depths,
        "depth": float(depths[0]),
    }
    if name in DRILLS:  # every value token of a restatement: a copy from its original
        vl, n = p["value_len"], p["n_pairs"]
        meta["drill_targets"] = np.concatenate([starts[i] + lens[i] - 1 - vl + np.arange(vl)
                                                for i in range(n, len(items))]).astype(np.int64)
    return Example(name, prompt, np.asarray(answer, np.int32), meta)


def token_name(tok: int) -> str:
    """A token as people read it: special tokens by name, ``k<i>`` / ``v<i>`` for the i-th key / value
    token, ``f<i>`` for filler, ``r<tok>`` for the reserved ids."""
    tok = int(tok)
    if not 0 <= tok < VOCAB_SIZE:
        raise ValueError(f"token {tok} is outside the vocabulary [0, {VOCAB_SIZE})")
    for prefix, rng in (("k", KEY_TOKENS), ("v", VALUE_TOKENS), ("f", FILLER_TOKENS)):
        if tok in rng:
            return f"{prefix}{tok - rng.start}"
    return _SPECIAL_NAMES[tok] if tok < len(_SPECIAL_NAMES) else f"r{tok}"


def describe(tokens) -> str:
    """``token_name`` of each token, space-separated."""
    return " ".join(token_name(t) for t in np.asarray(tokens).reshape(-1))


def score(name: str, example: Example, generated_tokens) -> float:
    """Exact match per answer position, averaged over the answer: a missing position counts wrong,
    tokens past the answer's length (EOS included) are ignored."""
    if name != example.task:
        raise ValueError(f"score: name {name!r} does not match the example's task {example.task!r}")
    gen = np.asarray(generated_tokens).reshape(-1)[:len(example.answer)]
    return float(np.sum(gen == example.answer[:len(gen)]) / len(example.answer))


def make_batch(names, context_len: int, seed: int, batch: int, params: dict | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Training batch: ``tokens`` int32 ``[batch, context_len + max_A + 1]`` and ``loss_mask`` float32 of the
    same shape, per the module docstring (row ``r``: task ``names[(seed * batch + r) % len(names)]``,
    example seed ``seed * batch + r``). ``params`` maps a task name to its parameters."""
    names = (names,) if isinstance(names, str) else tuple(names)
    if not names:
        raise ValueError("make_batch: names is empty")
    if batch < 1:
        raise ValueError(f"make_batch: batch must be >= 1, got {batch}")
    if seed < 0 or (seed + 1) * batch > HELDOUT_SEED:
        raise ValueError(f"make_batch: seed={seed} must be >= 0 with (seed + 1) * batch <= HELDOUT_SEED")
    params = params or {}
    unknown = set(params) - set(names)
    if unknown:
        raise ValueError(f"make_batch: params given for tasks not in names: {sorted(unknown)}")
    max_a = max(answer_length(n, **params.get(n, {})) for n in set(names))
    examples = [make_example(name, context_len, seed * batch + r, **params.get(name, {}))
                for r, name in enumerate(batch_tasks(names, seed, batch))]
    return example_rows(examples, context_len + max_a + 1)


def batch_tasks(names, seed: int, batch: int) -> list[str]:
    """The task of each row of ``make_batch(names, _, seed, batch)``: ``names[(seed * batch + r) % len(names)]``."""
    names = (names,) if isinstance(names, str) else tuple(names)
    return [names[(seed * batch + r) % len(names)] for r in range(batch)]


def example_rows(examples, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``tokens`` / ``loss_mask`` rows (the `make_batch` layout) of given examples of one context length,
    right-padded to ``width`` (e.g. held-out examples drawn with seeds >= ``HELDOUT_SEED``)."""
    tokens = np.full((len(examples), width), PAD, np.int32)
    mask = np.zeros((len(examples), width), np.float32)
    for r, ex in enumerate(examples):
        t, a = len(ex.prompt), len(ex.answer)
        if t + a + 1 > width:
            raise ValueError(f"example_rows: a {t}-token prompt with a {a}-token answer needs width >= {t + a + 1}")
        tokens[r, :t] = ex.prompt
        tokens[r, t:t + a] = ex.answer
        tokens[r, t + a] = EOS
        mask[r, t - 1:t + a] = 1.0
        mask[r, ex.meta.get("drill_targets", np.zeros(0, np.int64)) - 1] = 1.0
    return tokens, mask
