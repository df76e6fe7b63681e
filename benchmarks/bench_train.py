"""GPU figures for backbone-free Memory Indexer training (issue 5, item 6).

    PYTHONPATH=$PWD python3 benchmarks/bench_train.py --out $OUT            # small preset (GPU)
    PYTHONPATH=$PWD python3 benchmarks/bench_train.py --out /tmp/b --quick  # tiny smoke run (CPU)

Measures, on the ``small`` preset with synthetic long documents (``train.synthetic``):

1. dump throughput (tokens/s) of ``train.dump`` — the backbone's causal pass + index keys + per-step
   Lightning-Indexer top-k of every CSA layer (compile excluded: one warm-up document first), and the
   end-to-end rate including golden labels and shard writing;
2. training throughput (samples/s) of ``train.fit`` — median over logging windows after the first two
   (compile), evaluation time excluded; a sample = one query position with its positives + negatives;
3. the wall time to reach a recall plateau: ``train.fit`` evaluates on held-out documents every
   ``--eval-every`` steps; the plateau is the first evaluation whose ``--plateau-metric`` (default: recall
   at a fixed keep ratio of 0.2, which unlike recall at threshold 0.5 does not move with calibration) is
   within ``--plateau-tol`` of the run's best (time from the start of training, evaluation included).

Writes ``OUT/bench_train_<preset>.json`` (device, jax version, date, command, settings, figures, final
evaluation vs the recency / random baselines). Bulky data (dump, checkpoints) goes to a temporary
directory outside ``OUT`` (``--work`` to choose it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import jax

from train import dump, evaluate, fit

PAPER_NOTE = ("FlashMemory reports training its Memory Indexer in about one H20 GPU-hour; compare per sample "
              "with ms_per_sample below (the H20 has ~15% of an H100's dense bf16 throughput).")


def _device_info() -> dict:
    d = jax.devices()[0]
    return {"device": getattr(d, "device_kind", str(d)), "platform": d.platform, "n_devices": jax.device_count(),
            "jax_version": jax.__version__, "jaxlib_version": getattr(jax.lib, "__version__", None)
            or __import__("jaxlib").__version__, "python": platform.python_version()}


def bench_dump(args, work: str) -> tuple[str, dict]:
    c, params = dump.load_model(args.preset, {}, 0, None)
    data = os.path.join(work, "data")
    common = {"tau": args.tau, "min_layers": args.min_layers, "pad_multiple": args.pad_multiple,
              "batch_docs": args.batch_docs, "impl": args.impl, "progress": not args.no_progress}
    # warm-up (compile) on a throwaway directory with the same shapes
    warm = os.path.join(work, "warm")
    t0 = time.perf_counter()
    dump.dump_documents(warm, dump.synthetic_source(args.batch_docs, args.length, c.vocab_size, 999, args.tau), c,
                        params, **{**common, "progress": False})
    compile_s = time.perf_counter() - t0
    shutil.rmtree(warm, ignore_errors=True)
    t0 = time.perf_counter()
    s = dump.dump_documents(data, dump.synthetic_source(args.docs, args.length, c.vocab_size, 0, args.tau), c,
                            params, total=args.docs, **common)
    wall = time.perf_counter() - t0
    return data, {"docs": args.docs, "tokens_per_doc": args.length, "tokens": s["tokens_written"],
                  "tokens_per_s_backbone": s["tokens_per_s"], "tokens_per_s_end_to_end": s["tokens_written"] / wall,
                  "wall_s": wall, "first_call_s": compile_s, "totals": s["totals"],
                  "csa_layers": list(c.csa_layers), "index_topk": c.index_topk}


def _jsonl(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


def bench_fit(args, data: str, work: str) -> tuple[str, dict]:
    run = os.path.join(work, "run")
    argv = ["--data", data, "--out", run, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--warmup", str(args.warmup), "--eval-every", str(args.eval_every),
            "--save-every", str(args.steps), "--log-every", str(args.log_every), "--val-fraction",
            str(args.val_fraction), "--neg-ratio", str(args.neg_ratio), "--data-workers", str(args.data_workers),
            "--no-tensorboard"]
    if args.no_progress:
        argv.append("--no-progress")
    t0 = time.perf_counter()
    res = fit.main(argv)
    wall = time.perf_counter() - t0
    perf = _jsonl(os.path.join(run, "perf.jsonl"))
    rates = [p["samples_per_s"] for p in perf[2:]] or [p["samples_per_s"] for p in perf]
    sps = statistics.median(rates)
    evals = [(r["step"], r["eval"]) for r in _jsonl(os.path.join(run, "metrics.jsonl")) if "eval" in r]
    elapsed = {p["step"]: p["elapsed_s"] for p in perf}
    plateau = None
    key = args.plateau_metric
    if evals and key in evals[0][1]:
        best = max(e[key] for _, e in evals)
        for step, e in evals:
            if e[key] >= best - args.plateau_tol:
                plateau = {"metric": key, "step": step, "value": e[key], "best": best, "tolerance": args.plateau_tol,
                           "wall_s": elapsed.get(step), "samples": step * args.batch_size,
                           "recall_at_0.5": e["recall"], "keep_ratio_at_0.5": e["keep_ratio"], "auc": e["auc"]}
                break
    return run, {"steps": args.steps, "batch_size": args.batch_size, "samples_per_s": sps,
                 "ms_per_sample": 1000.0 / sps, "samples_per_s_windows": rates, "wall_s": wall,
                 "plateau": plateau, "eval_curve": [{"step": s, **e} for s, e in evals],
                 "final": res.get("eval")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="directory for the JSON result")
    p.add_argument("--work", default=None, help="directory for dump / checkpoints (default: a temp dir)")
    p.add_argument("--preset", default="small")
    p.add_argument("--quick", action="store_true", help="tiny preset, few docs and steps (CPU smoke test)")
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--length", type=int, default=16384, help="tokens per synthetic document")
    p.add_argument("--tau", type=int, default=16)
    p.add_argument("--min-layers", type=int, default=None, help="default: strict majority of the CSA layers")
    p.add_argument("--data-workers", type=int, default=8, help="host threads assembling training batches")
    p.add_argument("--pad-multiple", type=int, default=4096)
    p.add_argument("--batch-docs", type=int, default=1)
    p.add_argument("--impl", default="auto")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--neg-ratio", type=float, default=2.0)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--plateau-tol", type=float, default=0.01)
    p.add_argument("--plateau-metric", default="recall_at_keep_0.2",
                   help="eval metric of train.fit's metrics.jsonl (recall, auc, recall_at_keep_0.1, ...)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.preset, args.docs, args.length, args.tau, args.pad_multiple = "tiny", 10, 1024, 8, 256
        args.min_layers = 2 if args.min_layers is None else args.min_layers
        args.steps, args.batch_size, args.eval_every, args.log_every, args.warmup = 120, 16, 40, 10, 20
        args.val_fraction = 0.2
    os.makedirs(args.out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="bench_train_")
    os.makedirs(work, exist_ok=True)
    result = {**_device_info(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "preset": args.preset,
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work")}}
    try:
        data, result["dump"] = bench_dump(args, work)
        run, result["train"] = bench_fit(args, data, work)
        ev = evaluate.main(["--data", data, "--ckpt", run, "--out", os.path.join(work, "eval"), "--no-plot",
                            "--no-progress"])
        result["eval"] = {k: ev[k] for k in ("recall", "precision", "keep_ratio", "auc", "baselines_at_same_keep",
                                             "curve", "counts", "docs")}
        try:
            result["plot"] = evaluate.plot_curve(ev, os.path.join(args.out, f"bench_train_{args.preset}.png"))
        except ImportError as e:
            result["plot"] = f"skipped: {e}"
        result["paper_reference"] = PAPER_NOTE
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    path = os.path.join(args.out, f"bench_train_{args.preset}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=float)
    summary = {"device": result["device"], "dump_tokens_per_s": result["dump"]["tokens_per_s_backbone"],
               "train_samples_per_s": result["train"]["samples_per_s"], "plateau": result["train"]["plateau"],
               "recall": result["eval"]["recall"], "keep_ratio": result["eval"]["keep_ratio"],
               "random_at_same_keep": result["eval"]["baselines_at_same_keep"]["random"]}
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
