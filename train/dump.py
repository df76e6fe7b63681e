"""Dump Memory Indexer training data from the backbone (SPEC §6, §9): ``python -m train.dump``.

For every document the backbone runs once over the whole token sequence
(``fm_jax.backbone.run_sequence``, the uncached causal pass, which equals prefill followed by
teacher-forced decode). Recorded per target CSA layer: the layer's normed attention input ``h`` at every
position (bf16) and its packed index keys ([N, D + 4] uint8); from every voting CSA layer the Lightning
Indexer's top-k ids and logits at every step, cut by top-p on the device (``train.labels.kept_picks``),
from which ``train.labels.golden_labels`` builds the CSR labels as the FlashMemory release does (per-step
top-p, a vote of >= ``min_layers`` layers, union over the window, score = layer count; see
``train.labels``). The picks themselves are not stored.

**Query / hidden alignment (the engine's convention, ``serve/engine.py``).** At a cycle boundary with
``t`` tokens held the engine scores the Memory Indexer with the hidden state of the last processed token
(position ``t - 1``, RoPE position ``t - 1``) over the entries complete at that point, and the window
that follows runs the decode steps at positions ``t .. t + tau - 1``. A stored query position is that
query token ``s = t - 1``: ``query_positions[q] = s``, its hidden row is ``hidden_layer_{L}[s]`` (rows
indexed by position), its candidates are ``n_visible_entries(s, ratio)`` entries (``train.labels.
n_candidates``; = the engine's ``t // ratio``), and its positives come from the steps ``[s + 1, s + 1 +
tau)``. Boundaries: ``t = k * tau`` (k >= 1, whole window inside) for token files and synthetic
documents; for task documents (prompt ⧺ answer, teacher forced) the decode boundaries ``t = len(prompt)
+ k * tau`` (k >= 0, inside the document; the last window is cut at its end) plus ``--prompt-queries``
boundaries ``len(prompt) - j * tau`` inside the prompt. Queries that see fewer than ``--min-candidates``
entries are dropped.

Output (see ``train.data`` for the format): ``manifest.json``, one ``doc_<id>.safetensors`` per document
with a ``doc_<id>.json`` sidecar, and ``li_init.safetensors`` (the Lightning Indexer's query tower as a
FlashMemory joint checkpoint, the initialisation of ``train.fit``). A rerun with the same settings skips
documents whose shard and sidecar are complete; a rerun with different settings is refused.

Inputs: ``--tokens`` files (``.npy`` 1-D = one document, 2-D = one per row; ``.jsonl`` one JSON list of
token ids, or an object with ``"tokens"`` / ``"input_ids"``, per line), ``--synthetic N`` documents from
``train.synthetic``, or ``--tasks a,b --n-docs N --length L`` task documents from ``train.tasks``. The
backbone is ``init_params(preset, --model-seed)`` or a params checkpoint (``--model-params``).

Example (tiny preset, CPU)::

    python -m train.dump --out /tmp/fm_data --preset tiny --synthetic 16 --length 1024 --tau 8
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from fm_jax import backbone, cli, interop
from fm_jax import memory_indexer as mi
from fm_jax import model as fm_model
from fm_jax.config import ModelConfig, get_config
from train import data as D
from train.labels import DEFAULT_TOP_P, default_min_layers, golden_labels, kept_picks, query_grid, task_queries

SETTINGS_KEYS = ("model", "target_layers", "vote_layers", "tau", "top_p", "min_layers", "min_candidates",
                 "prompt_queries", "rope_dtype")


# ---------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------
def _safe_id(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", s)


def read_token_file(path: str) -> Iterator[tuple[str, np.ndarray, str]]:
    """Yields ``(doc_id, tokens int32 [T], source)`` from a ``.npy`` or ``.jsonl`` file."""
    stem = _safe_id(os.path.splitext(os.path.basename(path))[0])
    if path.endswith(".npy"):
        arr = np.load(path, allow_pickle=False)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{path}: token array must be integer, got {arr.dtype}")
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise ValueError(f"{path}: token array must be 1-D or 2-D, got shape {arr.shape}")
        for i, row in enumerate(arr):
            yield f"{stem}-{i:06d}", row.astype(np.int32), f"{path}[{i}]"
    elif path.endswith(".jsonl"):
        with open(path) as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i + 1}: not JSON: {e}") from None
                if isinstance(obj, dict):
                    obj = obj.get("tokens", obj.get("input_ids"))
                if not isinstance(obj, list) or not all(isinstance(x, int) and not isinstance(x, bool)
                                                        for x in obj):
                    raise ValueError(f"{path}:{i + 1}: expected a list of token ids "
                                     "(or an object with 'tokens' / 'input_ids')")
                yield f"{stem}-{i:06d}", np.asarray(obj, np.int32), f"{path}:{i + 1}"
    else:
        raise ValueError(f"{path}: unsupported token file (use .npy or .jsonl)")


def synthetic_source(n_docs: int, length: int, vocab_size: int, seed: int,
                     tau: int = 8) -> Iterator[tuple[str, np.ndarray, str]]:
    """Built-in synthetic documents with phrases of 2..4 tau tokens aligned to the tau grid."""
    from train.synthetic import synthetic_document

    for i in range(n_docs):
        toks = synthetic_document(length, vocab_size, np.random.default_rng([seed, i]), run_min=2 * tau,
                                  run_max=4 * tau, run_multiple=tau)
        yield f"syn{seed}-{i:06d}", toks, f"synthetic(seed={seed}, i={i}, length={length})"


def task_source(tasks, length: int, n_docs: int, seed: int) -> Iterator[tuple[str, np.ndarray, str, int]]:
    """``n_docs`` task documents (round-robin over ``tasks``) from ``train.tasks.make_example``: yields
    ``(doc_id, prompt ⧺ answer int32 [T], source, len(prompt))``."""
    from train import tasks as T  # imported here: the task suite is optional for every other source

    unknown = [t for t in tasks if t not in T.TASKS]
    if not tasks or unknown:
        raise ValueError(f"unknown task(s) {unknown or tasks!r}; train.tasks.TASKS = {list(T.TASKS)}")
    for i in range(n_docs):
        name = tasks[i % len(tasks)]
        ex_seed = seed * 1_000_003 + i
        ex = T.make_example(name, length, ex_seed)
        prompt, answer = np.asarray(ex.prompt, np.int32), np.asarray(ex.answer, np.int32)
        if prompt.ndim != 1 or answer.ndim != 1 or not len(prompt):
            raise ValueError(f"task {name!r} (seed {ex_seed}): prompt and answer must be 1-D, prompt non-empty")
        yield (f"{_safe_id(name)}-{seed}-{i:06d}", np.concatenate([prompt, answer]),
               f"task({name}, context_len={length}, seed={ex_seed})", len(prompt))


# ---------------------------------------------------------------------------------------------------
# backbone pass
# ---------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("config", "targets", "voters", "top_p", "impl"))
def _dump_forward(params, tokens, config, targets, voters, top_p, impl):
    _, _, aux = backbone.run_sequence(params, config, tokens, impl=impl)
    hidden = tuple(aux[lyr]["hidden"].astype(jnp.bfloat16) for lyr in targets)
    keys = tuple(aux[lyr]["index_keys"] for lyr in targets)
    kept = tuple(kept_picks(aux[lyr]["topk"], aux[lyr]["topk_logits"], top_p) for lyr in voters)
    return hidden, keys, kept


def _settings(model_config: ModelConfig, model_desc: dict, targets, voters, tau, top_p, min_layers,
              min_candidates, prompt_queries, rope_dtype) -> dict:
    import dataclasses

    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(model_config).items()}
    return {"model": {**model_desc, "config": cfg}, "target_layers": list(targets), "vote_layers": list(voters),
            "tau": tau, "top_p": top_p, "min_layers": min_layers, "min_candidates": min_candidates,
            "prompt_queries": prompt_queries, "rope_dtype": rope_dtype}


def _check_settings(out_dir: str, settings: dict) -> None:
    D.pin_settings(os.path.join(out_dir, "dump_settings.json"), settings, SETTINGS_KEYS,
                   f"{out_dir} holds a dump made with different settings")


def _doc_done(out_dir: str, doc_id: str) -> bool:
    side = os.path.join(out_dir, f"doc_{doc_id}.json")
    if not os.path.exists(side):
        return False
    try:
        with open(side) as f:
            e = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    path = os.path.join(out_dir, e.get("file", ""))
    # a document dumped before the page-blocked key layout is dumped again (one manifest, one layout)
    return os.path.exists(path) and os.path.getsize(path) == e.get("bytes") and e.get("key_layout") == "pages"


def build_manifest(out_dir: str, settings: dict, model_config: ModelConfig) -> dict:
    docs = []
    for name in sorted(os.listdir(out_dir)):
        if name.startswith("doc_") and name.endswith(".json"):
            with open(os.path.join(out_dir, name)) as f:
                docs.append(json.load(f))
    manifest = {
        "format": D.FORMAT, "version": D.VERSION, **settings,
        "ratio": model_config.csa_ratio, "d_model": model_config.d_model,
        "index_key_bytes": model_config.index_key_bytes, "index_topk": model_config.index_topk,
        **D.key_layout_fields(model_config.page_entries),
        "hidden_rows": "positions", "hidden_dtype": "bfloat16", "li_init": D.LI_INIT,
        "candidates": "visible", "label_score": "layer_count", "label_score_max": len(settings["vote_layers"]),
        "query": "last token before the window: positives from steps [s + 1, s + 1 + tau)", "docs": docs,
        "totals": {"docs": len(docs), "tokens": int(sum(d["n_tokens"] for d in docs)),
                   "queries": int(sum(d["n_queries"] for d in docs)),
                   "positives": int(sum(d["n_positives"] for d in docs))},
    }
    D.atomic_write_json(os.path.join(out_dir, D.MANIFEST), manifest)
    return manifest


def _pad_len(t: int, multiple: int, cap: int) -> int:
    return min(cap, -(-t // multiple) * multiple)


def dump_documents(out_dir: str, docs: Iterable[tuple], model_config: ModelConfig, model_params, *,
                   model_desc: dict | None = None, target_layers=None, vote_layers=None, tau: int = 16,
                   top_p: float = DEFAULT_TOP_P, min_layers: int | None = None, min_candidates: int | None = None,
                   prompt_queries: int = 0, pad_multiple: int = 512, batch_docs: int = 1, impl: str = "auto",
                   rope_dtype: str = "float32", progress: bool = True, total: int | None = None) -> dict:
    """Dump ``docs`` into ``out_dir``; returns a summary with throughput figures.

    ``docs`` yields ``(doc_id, tokens, source)`` (plain documents: ``query_grid``) or ``(doc_id, tokens,
    source, prompt_len)`` (task documents: ``task_queries`` with ``prompt_queries``)."""
    c = model_config
    csa = tuple(c.csa_layers)
    if not csa:
        raise ValueError("the model has no CSA layer: nothing to dump")
    icfg_probe = mi.config_from_model(c, rope_dtype=rope_dtype) if target_layers is None else None
    targets = tuple(int(x) for x in (target_layers or icfg_probe.target_layers))
    voters = tuple(int(x) for x in (vote_layers or csa))
    for lyr in targets + voters:
        if lyr not in csa:
            raise ValueError(f"layer {lyr} is not a CSA layer of the model (CSA layers: {csa})")
    min_layers = default_min_layers(len(voters)) if min_layers is None else int(min_layers)
    if not 1 <= min_layers <= len(voters):
        raise ValueError(f"min_layers={min_layers} must lie in [1, {len(voters)}]")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must lie in [0, 1]")
    if tau <= 0 or prompt_queries < 0:
        raise ValueError(f"tau={tau} must be positive and prompt_queries={prompt_queries} non-negative")
    min_candidates = c.index_topk if min_candidates is None else int(min_candidates)
    r = c.csa_ratio
    os.makedirs(out_dir, exist_ok=True)
    settings = _settings(c, model_desc or {}, targets, voters, tau, float(top_p), min_layers, min_candidates,
                         int(prompt_queries), rope_dtype)
    _check_settings(out_dir, settings)

    li_path = os.path.join(out_dir, D.LI_INIT)
    if not os.path.exists(li_path):
        icfg = mi.config_from_model(c, target_layers=targets, rope_dtype=rope_dtype)
        li = mi.init_from_lightning_indexer(icfg, model_params, c)
        tmp = li_path + ".tmp.safetensors"
        interop.save_flashmemory_checkpoint(tmp, icfg, li)
        os.replace(tmp, li_path)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="dump", unit="doc")
    n_done = n_skipped = n_tokens = 0
    t_compute = 0.0
    t_start = time.perf_counter()
    pending: list[tuple[str, np.ndarray, str, int | None]] = []

    def flush():
        nonlocal n_done, n_tokens, t_compute
        if not pending:
            return
        lens = [len(t) for _, t, _, _ in pending]
        t_pad = _pad_len(max(lens), pad_multiple, c.max_seq_len)
        toks = np.zeros((len(pending), t_pad), np.int32)
        for i, (_, t, _, _) in enumerate(pending):
            toks[i, :len(t)] = t
        t0 = time.perf_counter()
        hidden, keys, kept = _dump_forward(model_params, jnp.asarray(toks), config=c, targets=targets,
                                           voters=voters, top_p=float(top_p), impl=impl)
        hidden, keys, kept = jax.device_get((hidden, keys, kept))
        t_compute += time.perf_counter() - t0
        for b, (doc_id, t, source, prompt_len) in enumerate(pending):
            n = len(t)
            if prompt_len is None:
                positions = query_grid(n, tau, r, min_candidates)
            else:
                positions = task_queries(prompt_len, n, tau, r, min_candidates, prompt_queries)
            csr, stats = golden_labels({v: kept[i][b, :n] for i, v in enumerate(voters)}, positions, tau, r,
                                       min_layers)
            tensors = {"query_positions": positions, "label_indices": csr.indices, "label_scores": csr.scores,
                       "label_pointers": csr.pointers}
            for i, lyr in enumerate(targets):
                tensors[f"hidden_layer_{lyr}"] = np.asarray(hidden[i][b, :n]).astype(ml_dtypes.bfloat16)
                # page-blocked as the decode cache stores them (readers convert: `train.data.keys_as_rows`)
                tensors[f"compk_layer_{lyr}"] = D.stored_keys(np.asarray(keys[i][b, :n // r], np.uint8),
                                                              c.page_entries)
            fname = f"doc_{doc_id}.safetensors"
            info = D.save_shard(os.path.join(out_dir, fname), tensors,
                                {"format": D.FORMAT, "doc_id": doc_id, "n_tokens": n})
            entry = {"id": doc_id, "file": fname, **info, **D.key_layout_fields(c.page_entries),
                     "n_tokens": n, "n_entries": n // r,
                     "n_queries": len(positions), "n_positives": len(csr.indices), "prompt_len": prompt_len,
                     "source": source, **{k: round(v, 3) for k, v in stats.items()}}
            D.atomic_write_json(os.path.join(out_dir, f"doc_{doc_id}.json"), entry)
            n_done += 1
            n_tokens += n
            if bar is not None:
                bar.update(1)
                bar.set_postfix(tok_s=f"{n_tokens / max(t_compute, 1e-9):.0f}",
                                pos=f"{stats['positives_mean']:.0f}/{stats['candidates_mean']:.0f}")
        pending.clear()
        if n_done % 50 < batch_docs:
            build_manifest(out_dir, settings, c)

    seen = set()
    for doc in docs:
        doc_id, toks, source = doc[:3]
        prompt_len = int(doc[3]) if len(doc) > 3 and doc[3] is not None else None
        if doc_id in seen:
            raise ValueError(f"duplicate document id {doc_id!r}")
        seen.add(doc_id)
        toks = np.asarray(toks)
        if toks.ndim != 1 or len(toks) == 0:
            raise ValueError(f"document {doc_id} ({source}): tokens must be a non-empty 1-D array")
        if toks.min() < 0 or toks.max() >= c.vocab_size:
            raise ValueError(f"document {doc_id} ({source}): token ids must lie in [0, {c.vocab_size})")
        if len(toks) > c.max_seq_len:
            raise ValueError(f"document {doc_id} ({source}): {len(toks)} tokens exceed max_seq_len={c.max_seq_len}")
        if _doc_done(out_dir, doc_id):
            n_skipped += 1
            if bar is not None:
                bar.update(1)
            continue
        if prompt_len is not None and not 1 <= prompt_len <= len(toks):
            raise ValueError(f"document {doc_id} ({source}): prompt_len={prompt_len} outside [1, {len(toks)}]")
        pending.append((doc_id, toks.astype(np.int32), source, prompt_len))
        if len(pending) >= batch_docs:
            flush()
    flush()
    if bar is not None:
        bar.close()
    manifest = build_manifest(out_dir, settings, c)
    wall = time.perf_counter() - t_start
    return {"docs_written": n_done, "docs_skipped": n_skipped, "tokens_written": n_tokens,
            "compute_s": t_compute, "wall_s": wall, "tokens_per_s": n_tokens / max(t_compute, 1e-9),
            "totals": manifest["totals"]}


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
def _parse_override(s: str):
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"--override needs key=value, got {s!r}")
    k, v = s.split("=", 1)
    try:
        val = json.loads(v)
    except json.JSONDecodeError:
        val = v
    if isinstance(val, list):
        val = tuple(val)
    return k, val


def _int_list(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def _str_list(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def load_model(preset: str, overrides: dict, seed: int, params_dir: str | None):
    c = get_config(preset, **overrides)
    if params_dir:  # a params checkpoint of fm_jax.checkpoint.save_params, checked against the config
        from fm_jax.checkpoint import restore_params

        return c, restore_params(params_dir, c)
    return c, fm_model.init_params(c, jax.random.PRNGKey(seed))


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m train.dump", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (created; reruns resume)")
    src = p.add_argument_group("documents")
    src.add_argument("--tokens", nargs="+", type=cli.existing_file, default=[], help=".npy / .jsonl token files")
    src.add_argument("--synthetic", type=cli.nonneg_int, default=0, help="number of built-in synthetic documents")
    src.add_argument("--tasks", type=_str_list, default=(),
                     help="task documents from train.tasks (comma-separated names), round-robin")
    src.add_argument("--n-docs", type=cli.nonneg_int, default=0, help="number of task documents")
    src.add_argument("--length", type=cli.positive_int, default=1024,
                     help="tokens per synthetic document / context_len of task documents")
    src.add_argument("--synthetic-seed", type=int, default=0, help="seed of synthetic and task documents")
    m = p.add_argument_group("backbone")
    m.add_argument("--preset", default="tiny", help="fm_jax.config preset")
    m.add_argument("--override", type=_parse_override, action="append", default=[],
                   help="config field override key=value (JSON value), repeatable")
    m.add_argument("--model-seed", type=int, default=0, help="seed of init_params")
    m.add_argument("--model-params", type=cli.existing_dir, default=None,
                   help="backbone params (fm_jax.checkpoint.save_params directory)")
    m.add_argument("--impl", default="auto", choices=("auto", "xla", "pallas"), help="kernel implementation")
    lab = p.add_argument_group("labels")
    lab.add_argument("--target-layers", type=_int_list, default=None,
                     help="CSA layers whose hidden states / keys are stored (default: config_from_model's)")
    lab.add_argument("--vote-layers", type=_int_list, default=None, help="CSA layers that vote (default: all)")
    lab.add_argument("--tau", type=cli.positive_int, default=16, help="query grid / lookahead window in decode steps")
    lab.add_argument("--top-p", type=cli.unit_float, default=DEFAULT_TOP_P,
                     help="top-p over each layer's top-k softmax at every step (the release's client dump: 0.6)")
    lab.add_argument("--min-layers", type=cli.positive_int, default=None,
                     help="layers that must keep an entry at one step (default: 3, or all voters if fewer)")
    lab.add_argument("--prompt-queries", type=cli.nonneg_int, default=0,
                     help="task documents: extra query boundaries inside the prompt (on the tau grid)")
    lab.add_argument("--min-candidates", type=cli.nonneg_int, default=None,
                     help="first query needs this many complete entries (default: index_topk)")
    lab.add_argument("--rope-dtype", default="float32", choices=("float32", "bfloat16"),
                     help="RoPE dtype of the Memory Indexer config written to li_init.safetensors")
    run = p.add_argument_group("execution")
    run.add_argument("--pad-multiple", type=cli.positive_int, default=512,
                     help="pad sequence lengths to a multiple (compiles)")
    run.add_argument("--batch-docs", type=cli.positive_int, default=1, help="documents per backbone call")
    run.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if not args.tokens and args.synthetic <= 0 and not args.tasks:
        raise SystemExit("give --tokens FILE..., --synthetic N or --tasks NAMES --n-docs N")
    if args.tasks and args.n_docs <= 0:
        raise SystemExit("--tasks needs --n-docs N (N > 0)")
    overrides = dict(args.override)
    c, params = load_model(args.preset, overrides, args.model_seed, args.model_params)
    desc = {"preset": args.preset, "overrides": {k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in overrides.items()},
            "seed": args.model_seed, "params": os.path.abspath(args.model_params) if args.model_params else None}

    def sources():
        for path in args.tokens:
            yield from read_token_file(path)
        if args.synthetic > 0:
            yield from synthetic_source(args.synthetic, args.length, c.vocab_size, args.synthetic_seed, args.tau)
        if args.tasks:
            yield from task_source(args.tasks, args.length, args.n_docs, args.synthetic_seed)

    total = None if args.tokens else max(args.synthetic, 0) + (args.n_docs if args.tasks else 0)
    summary = dump_documents(args.out, sources(), c, params, model_desc=desc, target_layers=args.target_layers,
                             vote_layers=args.vote_layers, tau=args.tau, top_p=args.top_p,
                             min_layers=args.min_layers, min_candidates=args.min_candidates,
                             prompt_queries=args.prompt_queries, pad_multiple=args.pad_multiple,
                             batch_docs=args.batch_docs, impl=args.impl, rope_dtype=args.rope_dtype,
                             progress=not args.no_progress, total=total)
    print(json.dumps(summary), file=sys.stderr)
    return summary


if __name__ == "__main__":
    sys.exit(cli.run(main))
