import json

import pytest

from train import plot_metrics


def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_plots_a_run_with_phases_and_per_task_accuracy(tmp_path):
    recs = [{"step": s, "lm_loss": 3.0 / s, "kl": 0.1, "answer_acc": s / 10, "acc/local": 1.0, "acc1/local": 0.5,
             "length": 512 if s < 5 else 1024, "stage": "dense"} for s in range(1, 9)]
    recs.insert(3, {"step": 4, "eval/loss": 1.0})           # non-training lines are skipped
    path = _write(tmp_path / "metrics.jsonl", recs[::-1])    # any order: sorted by step
    loaded = plot_metrics.load(path)
    assert [r["step"] for r in loaded] == list(range(1, 9))
    out = plot_metrics.main([path, "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.endswith("c.png")


def test_refuses_a_file_without_training_records(tmp_path):
    with pytest.raises(ValueError, match="no training records"):
        plot_metrics.load(_write(tmp_path / "m.jsonl", [{"step": 1, "eval/loss": 2.0}]))
