"""Plot a pretraining run's ``metrics.jsonl`` (`train.pretrain`): the LM loss and the Lightning Indexer's KL
loss on one panel, the teacher-forced answer accuracy (overall and per task, ``acc/<task>``; dashed:
``acc1/<task>``, the first answer token) on the other, with the curriculum's phase changes marked.

    python -m train.plot_metrics RUN/pretrain/metrics.jsonl --out curve.png [--title "..."]
"""
from __future__ import annotations

import argparse
import json


def load(path: str) -> list[dict]:
    """The metric records of a ``metrics.jsonl``, in step order (training records only: those with a loss)."""
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    recs = [r for r in recs if "lm_loss" in r]
    if not recs:
        raise ValueError(f"{path}: no training records (lines with 'lm_loss')")
    return sorted(recs, key=lambda r: r["step"])


def plot(recs: list[dict], out: str, title: str = "pretraining") -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in recs]
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax_l.plot(steps, [r["lm_loss"] for r in recs], label="LM loss (answer)")
    if any("prompt_loss" in r for r in recs):
        ax_l.plot(steps, [r.get("prompt_loss", float("nan")) for r in recs], label="LM loss (prompt)")
    if any("kl" in r for r in recs):
        ax_l.plot(steps, [r.get("kl", float("nan")) for r in recs], label="indexer KL")
    ax_l.set_yscale("log")
    ax_a.plot(steps, [r["answer_acc"] for r in recs], "k-", lw=2, label="all tasks")
    for task in sorted({k for r in recs for k in r if k.startswith("acc/")}):
        line, = ax_a.plot(steps, [r.get(task, float("nan")) for r in recs], lw=1, label=task[4:])
        first = "acc1/" + task[4:]   # the first answer token (the key match), dashed in the task's colour
        if any(first in r for r in recs):
            ax_a.plot(steps, [r.get(first, float("nan")) for r in recs], lw=1, ls="--", color=line.get_color())
    ax_a.set_ylim(0, 1.02)
    ax_a.set_ylabel("answer accuracy (teacher-forced, + EOS; dashed: 1st token)")
    for prev, cur in zip(recs, recs[1:]):      # curriculum phase changes
        if (prev.get("length"), prev.get("stage")) != (cur.get("length"), cur.get("stage")):
            for ax in (ax_l, ax_a):
                ax.axvline(cur["step"], color="grey", ls=":", lw=1)
            ax_a.text(cur["step"], 0.02, f" {cur.get('length')} {cur.get('stage')}", fontsize=7, rotation=90)
    for ax in (ax_l, ax_a):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", help="a train.pretrain metrics.jsonl")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--title", default="pretraining")
    args = p.parse_args(argv)
    path = plot(load(args.metrics), args.out, args.title)
    print(path)
    return path


if __name__ == "__main__":
    main()
