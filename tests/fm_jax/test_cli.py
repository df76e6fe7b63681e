"""CLI errors (issue 14 item 1): every CLI turns bad input into one line `error: ...` on stderr with exit
status 2 and no traceback (`--debug` shows it); ranges are checked at parse time."""
import argparse
import pickle
import subprocess
import sys

import pytest

from fm_jax import cli
from serve import evaluate_tasks, generate
from train import dump, evaluate, fit, pickle_import, pretrain

# (CLI main, argv, a fragment of the expected message); every case fails before any model work.
BAD_INPUTS = [
    (pretrain.main, ["--out", "{tmp}/p", "--curriculum", "1024:fast:1"], "--curriculum: curriculum item"),
    (pretrain.main, ["--out", "{tmp}/p", "--steps", "0"], "argument --steps: must be >= 1"),
    (pretrain.main, ["--out", "{tmp}/p", "--lr", "-1"], "argument --lr: must be > 0.0"),
    (pretrain.main, ["--out", "{tmp}/p", "--tasks", "nope", "--preset", "tiny", "--override", "vocab_size=512",
                     "--steps", "1"], "unknown task 'nope'"),
    (evaluate_tasks.main, ["--out", "{tmp}/e", "--budget", "0"], "argument --budget: must be in (0.0, 1.0]"),
    (evaluate_tasks.main, ["--out", "{tmp}/e", "--lengths", "1024,-5"], "argument --lengths: expected"),
    (evaluate_tasks.main, ["--out", "{tmp}/e", "--modes", "full,bogus"], "unknown mode 'bogus'"),
    (evaluate_tasks.main, ["--out", "{tmp}/e", "--ckpt", "{tmp}"], "holds no trained model"),
    (generate.main, ["--context", "0"], "argument --context: must be >= 1, got 0"),
    (generate.main, ["--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (generate.main, ["--new-tokens", "-3"], "argument --new-tokens: must be >= 1"),
    (generate.main, ["--threshold", "1.5"], "argument --threshold: must be in [0.0, 1.0], got 1.5"),
    (generate.main, ["--threshold", "nan"], "argument --threshold: expected a finite number"),
    (generate.main, ["--kmax-pages", "0"], "argument --kmax-pages: must be >= 1, got 0"),
    (generate.main, ["--tail-pages", "-1"], "argument --tail-pages: must be >= 0"),
    (generate.main, ["--tau", "x"], "argument --tau: expected an integer, got 'x'"),
    (generate.main, ["--params", "/nonexistent"], "argument --params: no such directory: /nonexistent"),
    (generate.main, ["--indexer", "/nonexistent.safetensors"], "argument --indexer: no such file"),
    (generate.main, ["--mode", "bogus"], "argument --mode: invalid choice"),
    (generate.main, ["--random-weights", "--context", "64", "--indexer", "{tmp}/garbage.safetensors"],
     "--indexer {tmp}/garbage.safetensors: Error while deserializing header"),
    (generate.main, ["--random-weights", "--preset", "tiny", "--context", "100000"],
     "past the RoPE table (max_seq_len=16384)"),
    (generate.main, ["--random-weights", "--context", "512", "--kmax-pages", "1", "--tau", "8"],
     "kmax_pages=1 cannot hold the 2 pages"),
    (generate.main, ["--preset", "tiny"], "--preset goes with --random-weights"),
    (generate.main, ["--random-weights", "--ckpt", "{tmp}"], "--random-weights takes --preset"),
    (generate.main, ["--tail-pages", "2"], "--tail-pages goes with --kmax-pages"),
    (generate.main, ["--ckpt", "{tmp}"], "holds no trained model"),
    (generate.main, ["--indexer", "{tmp}/garbage.safetensors"], "--params and --indexer go together"),
    (generate.main, ["--task", "bogus"], "argument --task: invalid choice"),
    (generate.main, ["--budget", "0"], "argument --budget: must be in (0.0, 1.0]"),
    (dump.main, ["--out", "{tmp}/d"], "give --tokens FILE..., --synthetic N or --tasks NAMES --n-docs N"),
    (dump.main, ["--out", "{tmp}/d", "--synthetic", "2", "--tau", "0"], "argument --tau: must be >= 1"),
    (dump.main, ["--out", "{tmp}/d", "--synthetic", "-1"], "argument --synthetic: must be >= 0"),
    (dump.main, ["--out", "{tmp}/d", "--tokens", "/nonexistent.npy"], "argument --tokens: no such file"),
    (dump.main, ["--out", "{tmp}/d", "--synthetic", "2", "--override", "window=abc"],
     "invalid config field `window`='abc'"),
    (dump.main, ["--out", "{tmp}/d", "--synthetic", "2", "--model-params", "/nonexistent"],
     "argument --model-params: no such directory"),
    (fit.main, ["--data", "/nonexistent", "--out", "{tmp}/f"], "argument --data: no such directory"),
    (fit.main, ["--data", "{tmp}", "--out", "{tmp}/f", "--lr", "0"], "argument --lr: must be > 0.0"),
    (fit.main, ["--data", "{tmp}", "--out", "{tmp}/f", "--steps", "0"], "argument --steps: must be >= 1"),
    (fit.main, ["--data", "{tmp}", "--out", "{tmp}/f", "--val-fraction", "1.5"], "argument --val-fraction"),
    (fit.main, ["--data", "{tmp}", "--out", "{tmp}/f", "--no-progress"], "no manifest"),
    (evaluate.main, ["--data", "{tmp}", "--ckpt", "/nonexistent", "--out", "{tmp}/e"],
     "argument --ckpt: no such file or directory"),
    (evaluate.main, ["--data", "{tmp}", "--ckpt", "{tmp}", "--out", "{tmp}/e", "--threshold", "2"],
     "argument --threshold: must be in [0.0, 1.0]"),
    (evaluate.main, ["--data", "{tmp}", "--ckpt", "{tmp}/garbage.pkl", "--out", "{tmp}/e"],
     "unsupported checkpoint extension"),
    (pickle_import.main, ["--out", "{tmp}/p", "/nonexistent.pkl"], "argument pickles: no such file"),
    (pickle_import.main, ["--out", "{tmp}/p", "--ratio", "0", "{tmp}/garbage.pkl"], "argument --ratio: must be >= 1"),
    (pickle_import.main, ["--out", "{tmp}/p", "--no-progress", "{tmp}/garbage.pkl"], "cannot unpickle"),
    (pickle_import.main, ["--out", "{tmp}/p", "--no-progress", "{tmp}/unsafe.pkl"], "refused to load"),
]


@pytest.mark.parametrize("main,argv,message", BAD_INPUTS,
                         ids=[f"{m.__module__}:{' '.join(a)}" for m, a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_error_exit_2(tmp_path, capsys, main, argv, message):
    (tmp_path / "garbage.pkl").write_bytes(b"\xae not a pickle")
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "unsafe.pkl").write_bytes(pickle.dumps({"x": print}))  # references a global: refused
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    message = message.replace("{tmp}", str(tmp_path))
    assert cli.run(main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(SystemExit, match="give --tokens"):
        cli.run(dump.main, ["--out", str(tmp_path / "d"), "--debug"])
    with pytest.raises(ValueError, match="invalid config field"):
        cli.run(dump.main, ["--out", str(tmp_path / "d"), "--synthetic", "1", "--override", "window=abc", "--debug"])


def test_a_bug_keeps_its_traceback():
    def main(argv):
        raise ZeroDivisionError("bug")
    with pytest.raises(ZeroDivisionError):
        cli.run(main, [])


def test_run_passes_through_exit_codes(capsys):
    assert cli.run(lambda argv: 0, []) == 0
    assert cli.run(lambda argv: {"summary": 1}, []) == 0  # train CLIs return their summary
    assert cli.run(lambda argv: 3, []) == 3
    with pytest.raises(SystemExit) as e:  # --help exits 0 through argparse
        cli.ArgumentParser(prog="x").parse_args(["--help"])
    assert e.value.code == 0


def test_argument_types():
    assert cli.positive_int("3") == 3 and cli.nonneg_int("0") == 0 and cli.unit_float("1") == 1.0
    for parse, bad in ((cli.positive_int, "0"), (cli.nonneg_int, "-1"), (cli.unit_float, "-0.1"),
                       (cli.float_range(0.0, lo_open=True), "0"), (cli.int_range(2, 5), "6"), (cli.unit_float, "inf")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


def test_generate_subprocess_end_to_end():
    """The real entry point: `python -m serve.generate --context 0` (was a ZeroDivisionError traceback)."""
    p = subprocess.run([sys.executable, "-m", "serve.generate", "--context", "0"], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr == "error: argument --context: must be >= 1, got 0 (see python -m serve.generate --help)\n"
