"""Shared command-line plumbing: one-line user errors, `--debug`, and range-checked argument types.

Every CLI builds its parser with `ArgumentParser` (adds `--debug`; a bad flag prints one line
`error: ...` and exits 2) and ends with

    if __name__ == "__main__":
        sys.exit(cli.run(main))

`run` calls `main(argv)` and turns a user error (ValueError, an OSError such as a missing file,
`SystemExit("message")`) into `error: message` on stderr with exit status 2; `--debug` re-raises
it so the traceback shows. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import sys
from collections.abc import Callable, Sequence

EXIT_USAGE = 2

def _user_errors() -> tuple:
    """What bad input (flags, files) raises; anything else is a bug and keeps its traceback."""
    errors = [ValueError, OSError, pickle.UnpicklingError]  # a pickle refused as unsafe is bad input too
    try:  # a file that is not a safetensors file
        from safetensors import SafetensorError
        errors.append(SafetensorError)
    except ImportError:
        pass
    return tuple(errors)


USER_ERRORS = _user_errors()


class ArgumentParser(argparse.ArgumentParser):
    """argparse with `--debug` and one-line errors: `error: argument --x: ...` then exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the Python traceback of an error")

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = str(exc.args[0])
    return " ".join(text.split())  # one line


def run(main: Callable, argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)`; user errors become `error: ...` on stderr and exit status 2 (see module doc)."""
    raw = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in raw
    try:
        out = main(None if argv is None else list(argv))
    except SystemExit as exc:
        if isinstance(exc.code, str):  # SystemExit("message") from the CLI's own checks
            if debug:
                raise
            print(f"error: {exc.code}", file=sys.stderr)
            return EXIT_USAGE
        return exc.code if isinstance(exc.code, int) else 0
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"error: {_message(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return out if isinstance(out, int) and not isinstance(out, bool) else 0


# ------------------------------------------------------------------------------------------ argument types
def _number(kind: type, s: str):
    try:
        v = kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {s!r}") from None
    if kind is float and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """argparse `type=`: an int in [lo, hi] (None = unbounded)."""
    def parse(s: str) -> int:
        v = _number(int, s)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {_bounds(lo, hi)}, got {v}")
        return v
    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


def float_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Callable[[str], float]:
    """argparse `type=`: a finite float in [lo, hi] ((lo, hi] with `lo_open`)."""
    def parse(s: str) -> float:
        v = _number(float, s)
        below = lo is not None and (v <= lo if lo_open else v < lo)
        if below or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {_bounds(lo, hi, lo_open)}, got {v:g}")
        return v
    parse.__name__ = "float"
    return parse


def _bounds(lo, hi, lo_open=False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}]"
    if lo is not None:
        return f"> {lo}" if lo_open else f">= {lo}"
    return f"<= {hi}"


positive_int = int_range(1)
nonneg_int = int_range(0)
unit_float = float_range(0.0, 1.0)


def existing_dir(s: str) -> str:
    """argparse `type=`: a directory that exists."""
    if not os.path.isdir(s):
        what = "not a directory" if os.path.exists(s) else "no such directory"
        raise argparse.ArgumentTypeError(f"{what}: {s}")
    return s


def existing_file(s: str) -> str:
    """argparse `type=`: a regular file that exists."""
    if not os.path.isfile(s):
        what = "not a file" if os.path.exists(s) else "no such file"
        raise argparse.ArgumentTypeError(f"{what}: {s}")
    return s


def existing_path(s: str) -> str:
    """argparse `type=`: a file or directory that exists."""
    if not os.path.exists(s):
        raise argparse.ArgumentTypeError(f"no such file or directory: {s}")
    return s
