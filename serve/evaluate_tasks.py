"""The paper's accuracy table on the trained miniature: ``python -m serve.evaluate_tasks``.

Held-out instances of every task in `train.tasks` at several context lengths, answered greedily through
`serve.engine.generate` in the modes `full`, `lsa`, `recency` and `random`; the three reduced modes share
one device page budget (`--budget`, a fraction of the CSA pages at each context, the recency tail inside
it). Also the accuracy-vs-budget curve at one context, and for LSA the recall of golden entries: the
entries the full model's Lightning Indexers agree on while it writes the answer (`train.labels`, the
same rule as the Memory Indexer's training labels) that sit in the resident set LSA chose for that window.

Writes ``OUT/reproduction.json`` and two plots: ``accuracy_vs_context.png`` (retrieval tasks, each mode)
and ``accuracy_vs_budget.png`` (lsa / recency / random at the budget-sweep context).

    python -m serve.evaluate_tasks --out /tmp/fm_eval --lengths 4096,8192 --n 4
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from fm_jax import backbone, cli
from serve.engine import MODES, LSAConfig, generate
from serve.shipped import load_model
from train import labels as LB
from train import tasks as T

RETRIEVAL = tuple(t for t in T.TASKS if t != "local")


def batch_examples(name: str, length: int, n: int, seed: int):
    """n held-out examples of one task at one length (all prompts have exactly `length` tokens)."""
    return [T.make_example(name, length, seed + i) for i in range(n)]


@functools.partial(jax.jit, static_argnames=("config", "top_p"))
def _kept_picks(params, config, tokens, top_p: float):
    """Every CSA layer's top-p kept picks at every position of tokens [B, T] -> {layer: int32 [B, T, k]}."""
    _, _, aux = backbone.run_sequence(params, config, tokens)
    return {l: LB.kept_picks(aux[l]["topk"], aux[l]["topk_logits"], top_p) for l in config.csa_layers}


def golden_entries(params, config, examples, tau: int, top_p: float = LB.DEFAULT_TOP_P) -> list[np.ndarray]:
    """The golden entries of each example's first decode window (the Memory Indexer's training labels,
    `train.labels.golden_labels`, from a teacher-forced run of prompt + answer): entry ids per example."""
    tokens = np.stack([np.concatenate([e.prompt, e.answer]) for e in examples])
    kept = {l: np.asarray(v) for l, v in _kept_picks(params, config, jnp.asarray(tokens), top_p).items()}
    min_layers = LB.default_min_layers(len(kept))
    out = []
    for b, e in enumerate(examples):
        csr, _ = LB.golden_labels({l: k[b] for l, k in kept.items()}, [len(e.prompt) - 1], tau, config.csa_ratio,
                                  min_layers)
        out.append(csr.indices[csr.pointers[0]:csr.pointers[1]])
    return out


def golden_recall(golden: list[np.ndarray], resident_pages, page_entries: int) -> float | None:
    """Fraction of the golden entries that sit in the pages resident for the first window (pooled)."""
    hit = total = 0
    for g, pages in zip(golden, resident_pages):
        hit += int(np.isin(g // page_entries, np.asarray(pages)).sum())
        total += len(g)
    return hit / total if total else None


def run_mode(params, config, indexer, examples, mode: str, lsa: LSAConfig, new_tokens: int, batch: int,
             golden=None):
    """Greedy answers of `examples` in `mode` -> (scores [n], stats per call, generated tokens); with
    `golden` (per example) each call's stats get "golden_recall" of its first window's resident set."""
    scores, stats, outs = [], [], []
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        prompt = np.stack([e.prompt for e in chunk])
        res = generate(params, config, prompt, new_tokens, mode=mode, indexer=indexer if mode == "lsa" else None,
                       lsa=lsa, trace_resident=golden is not None)
        for e, toks in zip(chunk, res.tokens):
            scores.append(T.score(e.task, e, toks))
            outs.append(toks)
        if golden is not None and res.resident_tables:
            pages = [np.nonzero(row >= 0)[0] for row in res.resident_tables[0]]  # page_slot of the first window
            res.stats["golden_recall"] = golden_recall(golden[i:i + batch], pages, config.page_entries)
        stats.append(res.stats)
    return np.asarray(scores), stats, outs


def _mean_stat(stats, key):
    """Mean of a stat over the generate calls that have it (golden recall is None without golden entries)."""
    vals = [s[key] for s in stats if s.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def evaluate(args) -> dict:
    params, config, indexer = load_model(args.ckpt, args.params, args.indexer)
    names = T.TASKS if args.tasks == "all" else tuple(args.tasks.split(","))
    new_tokens = max(len(T.make_example(n, min(args.lengths), 0).answer) for n in names) + 1
    rows, t0, golden_cache = [], time.perf_counter(), {}
    runs = [(L, m, args.budget) for L in args.lengths for m in args.modes]
    runs += [(args.sweep_length, m, b) for b in args.sweep for m in ("lsa", "recency", "random")
             if (args.sweep_length, m, b) not in runs]
    for length, mode, budget in runs:
        lsa = LSAConfig.at_budget(config, length, budget, args.tail_fraction, args.tau, args.seed)
        batch = max(1, args.tokens_per_batch // length)
        for name in names:
            ex = batch_examples(name, length, args.n, args.seed_base + length)
            t1 = time.perf_counter()
            golden = None
            if mode != "full":
                key = (length, name)
                if key not in golden_cache:
                    golden_cache[key] = [g for i in range(0, len(ex), batch)
                                         for g in golden_entries(params, config, ex[i:i + batch], args.tau)]
                golden = golden_cache[key]
            sc, stats, _ = run_mode(params, config, indexer, ex, mode, lsa, new_tokens, batch, golden)
            row = {"length": length, "mode": mode, "budget": budget if mode != "full" else 1.0, "task": name,
                   "accuracy": float(sc.mean()), "n": len(sc), "kmax_pages": lsa.kmax_pages,
                   "tail_pages": lsa.recency_tail_pages,
                   "device_csa_fraction": _mean_stat(stats, "device_csa_fraction"),
                   "device_kv_fraction": _mean_stat(stats, "device_kv_fraction"),
                   "resident_fraction": _mean_stat(stats, "resident_fraction"),
                   "golden_recall": _mean_stat(stats, "golden_recall"),
                   "wall_s": round(time.perf_counter() - t1, 2)}
            rows.append(row)
            print(f"{length:>6} {mode:<8} budget={row['budget']:.3f} {name:<16} acc={row['accuracy']:.3f} "
                  f"csa={row['device_csa_fraction'] or 1.0:.3f}", file=sys.stderr, flush=True)
    return {"rows": rows, "summary": summarize(rows, args), "wall_s": round(time.perf_counter() - t0, 1)}


def _avg(rows, **match) -> float | None:
    sel = [r["accuracy"] for r in rows if all(r[k] == v if k != "task" else r["task"] in v for k, v in match.items())]
    return float(np.mean(sel)) if sel else None


def summarize(rows, args) -> dict:
    """Retrieval average and local-task accuracy per (length, mode) at the main budget, and the targets."""
    out = {}
    for length in args.lengths:
        for mode in args.modes:
            b = 1.0 if mode == "full" else args.budget
            out[f"{mode}@{length}"] = {
                "retrieval": _avg(rows, length=length, mode=mode, budget=b, task=RETRIEVAL),
                "local": _avg(rows, length=length, mode=mode, budget=b, task=("local",)),
                "device_csa_fraction": float(np.mean([r["device_csa_fraction"] or 1.0 for r in rows
                                                      if r["length"] == length and r["mode"] == mode
                                                      and r["budget"] == b])),
            }
    return out


def _save(plt, fig, ax, xlabel: str, title: str, path: str) -> str:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("exact match, retrieval tasks")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(result: dict, args, out: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; plots skipped (pip install matplotlib)", file=sys.stderr)
        return []
    rows, paths = result["rows"], []
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in args.modes:
        b = 1.0 if mode == "full" else args.budget
        ys = [_avg(rows, length=L, mode=mode, budget=b, task=RETRIEVAL) for L in args.lengths]
        ax.plot(args.lengths, ys, marker="o", label=mode if mode == "full" else f"{mode} (budget {args.budget:.0%})")
    ax.set_xscale("log", base=2)
    paths.append(_save(plt, fig, ax, "context length (tokens)", "Accuracy vs context",
                       os.path.join(out, "accuracy_vs_context.png")))
    fig, ax = plt.subplots(figsize=(6, 4))
    budgets = sorted(set(args.sweep) | ({args.budget} if args.sweep_length in args.lengths else set()))
    for mode in ("lsa", "recency", "random"):
        ys = [_avg(rows, length=args.sweep_length, mode=mode, budget=b, task=RETRIEVAL) for b in budgets]
        ax.plot([100 * b for b in budgets], ys, marker="o", label=mode)
    full = _avg(rows, length=args.sweep_length, mode="full", budget=1.0, task=RETRIEVAL)
    if full is not None:
        ax.axhline(full, color="k", ls="--", lw=1, label="full cache")
    paths.append(_save(plt, fig, ax, f"device page budget (% of CSA pages) at {args.sweep_length} tokens",
                       "Accuracy vs device-KV budget", os.path.join(out, "accuracy_vs_budget.png")))
    return paths


def _list(kind, check, what):
    def parse(s: str):
        try:
            vals = tuple(kind(x) for x in s.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {s!r}") from None
        if not vals or not all(check(v) for v in vals):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {s!r}")
        return vals
    return parse


_ints = _list(int, lambda v: v > 0, "positive ints")
_fractions = _list(float, lambda v: 0 < v <= 1, "budget fractions in (0, 1]")


def build_parser():
    p = cli.ArgumentParser(prog="python -m serve.evaluate_tasks", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", type=cli.existing_dir, default=None,
                   help="model directory (backbone/ + memory_indexer.safetensors; default: checkpoints/mini)")
    p.add_argument("--params", type=cli.existing_dir, default=None, help="backbone params (instead of --ckpt)")
    p.add_argument("--indexer", type=cli.existing_file, default=None,
                   help="Memory Indexer, FlashMemory .safetensors (with --params)")
    p.add_argument("--tasks", default="all")
    p.add_argument("--lengths", type=_ints, default=(4096, 8192, 16384, 32768))
    p.add_argument("--modes", type=lambda s: tuple(s.split(",")), default=MODES)
    p.add_argument("--n", type=cli.positive_int, default=16, help="held-out examples per task and length")
    p.add_argument("--budget", type=cli.float_range(0.0, 1.0, lo_open=True), default=0.1,
                   help="page budget of lsa/recency/random (fraction of the CSA pages)")
    p.add_argument("--tail-fraction", type=cli.unit_float, default=0.25,
                   help="recency tail, as a fraction of the budget")
    p.add_argument("--sweep", type=_fractions, default=(0.05, 0.1, 0.2, 0.4))
    p.add_argument("--sweep-length", type=cli.positive_int, default=None,
                   help="context of the budget sweep (default: longest)")
    p.add_argument("--tau", type=cli.positive_int, default=64)
    p.add_argument("--tokens-per-batch", type=cli.positive_int, default=131072, help="prompt tokens per generate call")
    p.add_argument("--seed", type=int, default=0, help="mode=random's page choice")
    p.add_argument("--seed-base", type=int, default=T.HELDOUT_SEED + 1_000_000,
                   help="held-out examples' seeds start here (>= train.tasks.HELDOUT_SEED: never trained on)")
    return p


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    for m in args.modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; choose from {MODES}")
    names = T.TASKS if args.tasks == "all" else tuple(args.tasks.split(","))
    for n in names:
        if n not in T.TASKS:
            raise SystemExit(f"unknown task {n!r}; choose from {T.TASKS}")
    args.sweep_length = args.sweep_length or max(args.lengths)
    os.makedirs(args.out, exist_ok=True)
    result = evaluate(args)
    result.update({"command": "python -m serve.evaluate_tasks " + " ".join(argv),
                   "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                   "date": time.strftime("%Y-%m-%d")})
    result["plots"] = plot(result, args, args.out)
    with open(os.path.join(args.out, "reproduction.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["summary"], indent=1))
    return result


if __name__ == "__main__":
    sys.exit(cli.run(main))
