"""Short `train.pretrain` runs side by side on one GPU, to compare recipes or architecture variants
(issue 9's diagnostics): each variant is one ``python -m train.pretrain`` process with the shared
arguments plus its own, all started at once with a slice of the GPU memory each (JAX's default
75% preallocation would let only one start), cut at a wall-clock deadline. Writes one JSON with
every variant's command, exit status and training curve, and one plot of the per-task teacher-forced
answer accuracy.

    python -m benchmarks.ablate_pretrain --out results.json --deadline 500 \\
        --common "--preset mini --steps 1500 --curriculum 256:dense:1.0 ..." \\
        --variant base= --variant plain_residual="--override hc_mult=1"
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

TASK_CURVES = ("acc/", "acc1/")  # train.pretrain's per-task answer and first-token accuracies


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``name=extra args`` -> (name, argv list)."""
    name, sep, rest = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"--variant wants NAME=ARGS with NAME an identifier, got {text!r}")
    return name, shlex.split(rest)


def read_curve(path: str) -> list[dict]:
    """The training records of a run's metrics.jsonl (empty when the run logged nothing)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    keep = ("step", "lm_loss", "prompt_loss", "answer_acc", "kl", "length", "stage")
    return [{k: v for k, v in r.items() if k in keep or k.startswith(TASK_CURVES)} for r in recs if "lm_loss" in r]


def plot(results: dict, out_png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({k for v in results.values() for r in v["curve"] for k in r if k.startswith("acc/")})
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(5 * max(len(tasks), 1), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, (name, v) in enumerate(results.items()):
            for key, style, label in ((task, "-", name), ("acc1/" + task[4:], "--", None)):
                pts = [(r["step"], r[key]) for r in v["curve"] if key in r]
                if pts:
                    ax.plot(*zip(*pts), style, color=f"C{i}", label=label)
        ax.set_title(f"{task[4:]} (dashed: first answer token)")
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("answer accuracy (teacher-forced)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON path (the plot goes beside it as .png)")
    ap.add_argument("--common", default="", help="arguments every variant's train.pretrain gets")
    ap.add_argument("--variant", action="append", type=parse_variant, required=True,
                    help="NAME=extra train.pretrain arguments (repeatable)")
    ap.add_argument("--deadline", type=float, default=500.0, help="seconds before unfinished runs are stopped")
    ap.add_argument("--mem-fraction", type=float, default=None,
                    help="XLA_PYTHON_CLIENT_MEM_FRACTION per process (default 0.9 / number of variants)")
    ap.add_argument("--workdir", default=None, help="where the runs go (default: a temporary directory)")
    ap.add_argument("--what", default="", help="a sentence for the JSON: what the comparison asks")
    args = ap.parse_args(argv)

    names = [n for n, _ in args.variant]
    if len(set(names)) != len(names):
        ap.error(f"variant names must be unique, got {names}")
    work = args.workdir or tempfile.mkdtemp(prefix="ablate_")
    os.makedirs(work, exist_ok=True)
    frac = args.mem_fraction or round(0.9 / len(names), 3)
    env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": str(frac), "PYTHONUNBUFFERED": "1"}
    procs = {}
    t0 = time.time()
    for name, extra in args.variant:
        cmd = [sys.executable, "-m", "train.pretrain", "--out", os.path.join(work, name), *shlex.split(args.common),
               *extra, "--no-progress", "--no-tensorboard"]
        log = open(os.path.join(work, f"{name}.log"), "w")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), cmd, log)
    while time.time() - t0 < args.deadline and any(p.poll() is None for p, _, _ in procs.values()):
        time.sleep(2)
    results = {}
    for name, (p, cmd, log) in procs.items():
        stopped = p.poll() is None
        if stopped:
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()
        with open(log.name) as f:
            tail = f.read()[-1500:]
        results[name] = {"command": shlex.join(["python3", *cmd[1:]]), "returncode": p.returncode,
                         "stopped_at_deadline": stopped,
                         "log_tail": tail if p.returncode not in (0, None) and not stopped else "",
                         "curve": read_curve(os.path.join(work, name, "metrics.jsonl"))}
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # only asks the device's name
    import jax

    record = {"what": args.what, "device": jax.devices()[0].device_kind if jax.default_backend() == "gpu" else "cpu",
              "jax": jax.__version__, "date": datetime.date.today().isoformat(),
              "command": shlex.join(["python3", "-m", "benchmarks.ablate_pretrain", *(argv or sys.argv[1:])]),
              "wall_s": round(time.time() - t0, 1), "mem_fraction": frac, "variants": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    plot(results, os.path.splitext(args.out)[0] + ".png")
    for name, v in results.items():
        last = v["curve"][-1] if v["curve"] else {}
        print(name, "rc", v["returncode"], "steps", last.get("step"),
              {k: round(x, 3) for k, x in last.items() if k.startswith(TASK_CURVES) or k == "lm_loss"})
    return record


if __name__ == "__main__":
    main()
