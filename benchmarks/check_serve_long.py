"""One `python -m serve.generate` run with its peak device memory recorded (issue 10 item 5: the main
command at the preset's RoPE table, within an 80 GB GPU's memory).

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.46 PYTHONPATH=$PWD python3 benchmarks/check_serve_long.py \\
        --out benchmarks/results/serve-small-256k-h200.json -- \\
        --random-weights --preset small --context 262000 --new-tokens 64 --mode lsa --compare

Everything after `--` goes to `serve.generate` unchanged (`--json` is added). The JSON holds the run
info, generate's own JSON (answers, device-KV fractions, prefill and decode times) and the device's
`memory_stats()` after the run: `peak_bytes_in_use` is the process's peak over every mode `--compare`
ran, `bytes_limit` what JAX was allowed to allocate (0.46 of an H200's 141 GB is about the 64 GB JAX
takes by default on an 80 GB H100).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time

from benchmarks.common import device_memory, run_info, write_json
from fm_jax import cli
from serve import generate


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv[:split])
    gen_args = argv[split + 1:] + ["--json"]
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.run(generate.main, gen_args)  # user errors -> "error: ..." on stderr, exit status 2
    wall = time.perf_counter() - t0
    text = out.getvalue()
    start = text.find("{")
    if rc != 0 or start < 0:
        raise SystemExit(f"serve.generate {' '.join(gen_args)} exited {rc}:\n{(err.getvalue() + text)[-2000:]}")
    payload = {**run_info(), "generate_args": gen_args,
               "xla_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
               "wall_s": wall, "memory": device_memory(), "generate": json.loads(text[start:])}
    write_json(args.out, payload)
    print(json.dumps({"memory": payload["memory"], "wall_s": round(wall, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
