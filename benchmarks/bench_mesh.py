"""One device vs ("data", "model") meshes for the engine (issue 11): the same `generate` run (random prompt
tokens, ragged lengths, greedy) on one device and on each mesh, for each mode and matmul precision.
Records per (precision, mode, mesh): whether the tokens equal one device's, the first step where a
request's tokens differ, the per-step token agreement, the largest logit difference before any token
differs (at the first generated token, the prefill's, and over all steps), and the decode step time.

    PYTHONPATH=$PWD python3 benchmarks/bench_mesh.py --out benchmarks/results/mesh-h200x2.json
    # CPU check of the script:
    XLA_FLAGS=--xla_force_host_platform_device_count=4 PYTHONPATH=$PWD python3 benchmarks/bench_mesh.py \\
        --smoke --out /tmp/mesh.json

`--precisions highest,default` runs the float32 config as it means float32 (the config's default for
float32, `ModelConfig.matmul_precision`) and with XLA's default (TF32 matmuls on a GPU): the difference
between the two rows' agreement is what TF32 costs a mesh.
"""
from __future__ import annotations

import argparse

import jax
import numpy as np

from benchmarks.common import run_info, write_json
from fm_jax import memory_indexer as mi
from fm_jax.config import get_config
from fm_jax.model import init_params
from fm_jax.sharding import make_mesh
from serve.engine import LSAConfig, generate

PRECISIONS = ("highest", "tensorfloat32", "default")


def parse_meshes(text: str) -> list[tuple[int, int]]:
    """'2x1,1x2' -> [(2, 1), (1, 2)] (data x model)."""
    try:
        return [tuple(int(v) for v in m.split("x", 1)) for m in text.split(",")]
    except ValueError:
        raise SystemExit(f"--meshes: expected DATAxMODEL[,DATAxMODEL...], got {text!r}") from None


def agreement(ref, res) -> dict:
    """Tokens [B, n] / logits [B, n, V] of one device (`ref`) vs a mesh (`res`). Logits are compared only
    up to each request's first differing token (after it the two decode different sequences)."""
    same = ref.tokens == res.tokens                                   # [B, n]
    n = same.shape[1]
    first_diff = np.where(same.all(1), n, np.argmin(same, axis=1))    # per request: steps that agree
    valid = np.arange(n)[None, :] <= np.minimum(first_diff, n - 1)[:, None]  # the first differing step's
    diff = np.abs(res.logits - ref.logits).max(-1)                    # logits still share their input
    return {"tokens_equal": bool(same.all()), "first_token_diff_step": first_diff.tolist(),
            "token_agreement_per_step": same.mean(0).round(4).tolist(),
            "logits_max_abs_diff_prefill": float(diff[:, 0].max()),
            "logits_max_abs_diff_first_decode": float(diff[:, 1].max()) if n > 1 else None,
            "logits_max_abs_diff_agreeing_steps": float(diff[valid].max()),
            "logits_max_abs": float(np.abs(ref.logits).max())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default="small")
    ap.add_argument("--meshes", default="2x1,1x2", help="data x model, comma separated")
    ap.add_argument("--modes", default="full,lsa")
    ap.add_argument("--precisions", default="highest,default", help=f"matmul precisions, of {PRECISIONS}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--tau", type=int, default=32)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--kmax-pages", type=int, default=8, help="lsa: resident pages per request")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check of the script)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.config, args.batch, args.prompt, args.tau, args.windows, args.kmax_pages = "tiny", 4, 72, 8, 2, 2
    meshes = parse_meshes(args.meshes)
    modes, precisions = args.modes.split(","), args.precisions.split(",")
    for p in precisions:
        if p not in PRECISIONS:
            raise SystemExit(f"--precisions: unknown precision {p!r} (choose from {PRECISIONS})")
    for d, m in meshes:
        if d * m > jax.device_count() or args.batch % d:
            raise SystemExit(f"--meshes: {d}x{m} needs {d * m} devices ({jax.device_count()} here) and a batch "
                             f"that {d} divides ({args.batch})")
    overrides = {"n_layers": 2, "compress_ratios": (0, 4), "ffn": "moe"} if args.smoke else {}
    base = get_config(args.config, dtype="float32", **overrides)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, base.vocab_size, (args.batch, args.prompt)).astype(np.int32)
    lengths = np.maximum(1, args.prompt - rng.integers(0, args.prompt // 4, args.batch)).astype(np.int32)
    lengths[0] = args.prompt
    n_new = 1 + args.windows * args.tau
    lsa = LSAConfig(tau=args.tau, kmax_pages=args.kmax_pages, recency_tail_pages=min(4, args.kmax_pages - 1))
    rows = []
    for prec in precisions:
        c = base.replace(matmul_precision=prec)
        params = init_params(c, jax.random.PRNGKey(0))
        icfg = mi.config_from_model(c)
        indexer = (icfg, mi.init_params(icfg, jax.random.PRNGKey(1)))
        for mode in modes:
            kw = dict(mode=mode, indexer=indexer, lsa=lsa, return_logits=True, lengths=lengths)
            # twice: one device must be deterministic for the comparison to mean much
            ref, again = (generate(params, c, prompt, n_new, **kw) for _ in range(2))
            step_ms = lambda r: 1e3 * r.stats["decode_s"] / ((args.windows - 1) * args.tau)
            base_row = {"precision": prec, "mode": mode, "batch": args.batch, "prompt": args.prompt,
                        "lengths": lengths.tolist(), "new_tokens": n_new}
            rows.append({**base_row, "mesh": "single", "step_ms": step_ms(ref),
                         "rerun_tokens_equal": bool((ref.tokens == again.tokens).all()),
                         "rerun_logits_bit_equal": bool((ref.logits == again.logits).all())})
            print(rows[-1], flush=True)
            for d, m in meshes:
                res = generate(params, c, prompt, n_new, mesh=make_mesh(d, m), **kw)
                rows.append({**base_row, "mesh": f"{d}x{m}", "step_ms": step_ms(res), **agreement(ref, res)})
                print({k: v for k, v in rows[-1].items() if k != "token_agreement_per_step"}, flush=True)
    write_json(args.out, {**run_info(), "config": args.config, "dtype": base.dtype, "device_count": jax.device_count(),
                          "rows": rows,
                          "note": "greedy decode from random prompt tokens and random weights; logits compared up "
                                  "to each request's first differing token; step_ms excludes the first window "
                                  "(compilation)"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
