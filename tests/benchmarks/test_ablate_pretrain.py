import argparse
import json

import pytest

from benchmarks.ablate_pretrain import parse_variant, read_curve


def test_parse_variant_splits_name_and_shell_args():
    assert parse_variant("base=") == ("base", [])
    assert parse_variant('plain=--override hc_mult=1 --lr "1e-3"') == (
        "plain", ["--override", "hc_mult=1", "--lr", "1e-3"])


@pytest.mark.parametrize("bad", ["no_equals", "1bad=--lr 1", "has-dash=--lr 1", "=--lr 1"])
def test_parse_variant_refuses_names_that_are_not_identifiers(bad):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_variant(bad)


def test_read_curve_keeps_training_records_and_task_accuracies(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [
        {"step": 50, "lm_loss": 3.1, "answer_acc": 0.2, "acc/niah_single": 0.5, "acc1/niah_single": 0.25, "lr": 1e-3,
         "grad_norm": 2.0},
        {"step": 50, "eval_loss": 3.0},  # an eval record: not part of the training curve
        {"step": 100, "lm_loss": 2.5, "answer_acc": 0.4, "kl": 0.1, "stage": "dense", "length": 256},
    ]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    curve = read_curve(str(path))
    assert curve == [
        {"step": 50, "lm_loss": 3.1, "answer_acc": 0.2, "acc/niah_single": 0.5, "acc1/niah_single": 0.25},
        {"step": 100, "lm_loss": 2.5, "answer_acc": 0.4, "kl": 0.1, "stage": "dense", "length": 256},
    ]
    assert read_curve(str(tmp_path / "absent.jsonl")) == []
