"""Soak: a long decode (default 100K tokens, tiny preset, CPU) in `full` and in `lsa` with a keep-all
budget, checking what a short test cannot see (issue 14):

* compilations after the first cycle (the first window, its write-through and the next boundary;
  counted from jax.monitoring's backend-compile events, plus the window function's jit cache size)
  must not grow;
* host RSS and the bytes of live device arrays, sampled every `--sample-every` steps, stay flat;
* keep-all LSA (threshold 0, every page resident) stays bit-identical to full to the end: the
  logits of every window are hashed in both runs and compared;
* LSA with a small budget (`--kmax-pages`, evictions and recalls every cycle) for the same checks of
  compilations and memory (its outputs differ from full by design).

    python -m benchmarks.bench_soak --tokens 100000 --out benchmarks/results/soak-cpu.json

Outputs stream out of the engine (`decode_loop(stream=...)`), so the run keeps no growing output.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time

import jax
import numpy as np

from benchmarks.common import run_info, write_json
from fm_jax import cli, get_config
from fm_jax import memory_indexer as mi
from fm_jax.model import init_params
from serve import engine
from serve.engine import LSAConfig, generate

_COMPILES = [0]


def _on_event(event: str, *_args, **_kw):
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


def host_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def device_bytes() -> int:
    """Bytes in use on the default device: the allocator's figure where the backend reports one (GPU),
    else the sum over live jax arrays (CPU reports no memory stats)."""
    stats = jax.devices()[0].memory_stats()
    if stats and "bytes_in_use" in stats:
        return int(stats["bytes_in_use"])
    return int(sum(a.nbytes for a in jax.live_arrays()))


def soak_one(name, params, config, prompt, n_tokens: int, mode: str, lsa: LSAConfig, indexer, sample_every: int,
             reference_digests: list | None = None, progress: bool = False) -> tuple[dict, list]:
    """Decode `n_tokens` and sample every `sample_every` steps. Returns (record, per-window logit digests)."""
    digests, samples = [], []
    state = {"steps": 0, "next_sample": sample_every, "compiles0": None, "jit0": None, "first_mismatch": None,
             "t0": None}

    def sample(steps):
        samples.append({"step": steps, "host_rss_bytes": host_rss_bytes(), "device_bytes": device_bytes(),
                        "compiles": _COMPILES[0] - state["compiles0"],
                        "window_jit_cache": engine.run_window._cache_size(),
                        "wall_s": time.perf_counter() - state["t0"]})
        if progress:
            s = samples[-1]
            print(f"[{name}] step {steps}: rss {s['host_rss_bytes'] / 2**20:.1f} MiB, device "
                  f"{s['device_bytes'] / 2**20:.2f} MiB, compiles after the first cycle: {s['compiles']}, "
                  f"{s['wall_s']:.0f} s", file=sys.stderr, flush=True)

    def stream(window, toks, logits):
        if window == 1:  # the first cycle (window 0, its write-through, boundary 1) compiled everything
            state["compiles0"] = _COMPILES[0]
            state["jit0"] = engine.run_window._cache_size()
            state["t0"] = time.perf_counter()
        d = hashlib.sha256(np.ascontiguousarray(logits).tobytes()).hexdigest()
        digests.append(d)
        if reference_digests is not None and state["first_mismatch"] is None and d != reference_digests[window]:
            state["first_mismatch"] = window
        state["steps"] += toks.shape[1]
        while window >= 1 and state["steps"] >= state["next_sample"]:
            sample(state["next_sample"])
            state["next_sample"] += sample_every

    t0 = time.perf_counter()
    res = generate(params, config, prompt, n_tokens, mode=mode, indexer=indexer, lsa=lsa, return_logits=True,
                   stream=stream)
    wall = time.perf_counter() - t0
    rss = [s["host_rss_bytes"] for s in samples]
    dev = [s["device_bytes"] for s in samples]
    rec = {
        "mode": mode, "lsa_config": dataclasses.asdict(lsa) if mode != "full" else None,
        "threshold": indexer[0].threshold if indexer else None, "decoded_steps": state["steps"], "wall_s": wall,
        "steady_tokens_per_s": res.stats["decode_tokens_per_s"],
        "compiles_after_first_cycle": samples[-1]["compiles"] if samples else None,
        "window_jit_cache_growth": engine.run_window._cache_size() - state["jit0"],
        "host_rss_growth": (max(rss) - rss[0]) / rss[0] if rss else None,
        "device_bytes_growth": (max(dev) - dev[0]) / dev[0] if dev else None,
        "device_kv_bytes": res.stats["device_kv_bytes"], "full_kv_bytes": res.stats["full_kv_bytes"],
        "recalled_bytes": res.stats["recalled_bytes"], "resident_fraction": res.stats["resident_fraction"],
        "samples": samples,
    }
    if reference_digests is not None:
        rec["bit_identical_to_full"] = state["first_mismatch"] is None and len(digests) == len(reference_digests)
        rec["first_mismatching_window"] = state["first_mismatch"]
    return rec, digests


def run(n_tokens: int, *, prompt_len: int = 256, tau: int = 64, batch: int = 1, sample_every: int = 1000,
        kmax_pages: int = 8, seed: int = 0, progress: bool = False) -> dict:
    # RoPE table long enough for the whole decode
    max_len = prompt_len + 1 + -(-(n_tokens - 1) // tau) * tau
    config = get_config("tiny", max_seq_len=1 << max(max_len - 1, 1).bit_length())
    params = init_params(config, jax.random.PRNGKey(seed))
    icfg = mi.config_from_model(config)
    iparams = mi.init_from_lightning_indexer(icfg, params, config)
    prompt = jax.random.randint(jax.random.PRNGKey(seed + 1), (batch, prompt_len), 0, config.vocab_size)
    out = {"run": run_info(), "preset": "tiny", "max_seq_len": config.max_seq_len, "prompt_len": prompt_len,
           "tokens": n_tokens, "tau": tau, "batch": batch, "sample_every": sample_every}
    common = dict(sample_every=sample_every, progress=progress)
    out["full"], digests = soak_one("full", params, config, prompt, n_tokens, "full", LSAConfig(tau=tau), None,
                                    **common)
    keep_all = LSAConfig(tau=tau, kmax_pages=1 << 30)  # threshold 0: every entry scores >= 0
    out["lsa_keep_all"], _ = soak_one("lsa_keep_all", params, config, prompt, n_tokens, "lsa", keep_all,
                                      (icfg.replace(threshold=0.0), iparams), reference_digests=digests, **common)
    budget = LSAConfig(tau=tau, kmax_pages=kmax_pages, recency_tail_pages=min(2, kmax_pages), sink_pages=1)
    out["lsa_budget"], _ = soak_one("lsa_budget", params, config, prompt, n_tokens, "lsa", budget, (icfg, iparams),
                                    **common)
    return out


RUNS = ("full", "lsa_keep_all", "lsa_budget")


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="python -m benchmarks.bench_soak", description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=cli.int_range(2), default=100_000, help="tokens decoded per mode")
    ap.add_argument("--prompt", type=cli.positive_int, default=256)
    ap.add_argument("--tau", type=cli.positive_int, default=64)
    ap.add_argument("--batch", type=cli.positive_int, default=1)
    ap.add_argument("--sample-every", type=cli.positive_int, default=1000)
    ap.add_argument("--kmax-pages", type=cli.positive_int, default=8, help="budget of the lsa_budget run")
    ap.add_argument("--out", default=None, help="JSON path (default: print)")
    args = ap.parse_args(argv)
    res = run(args.tokens, prompt_len=args.prompt, tau=args.tau, batch=args.batch, sample_every=args.sample_every,
              kmax_pages=args.kmax_pages, progress=True)
    if args.out:
        write_json(args.out, res)
    summary = {m: {k: v for k, v in res[m].items() if k != "samples"} for m in RUNS}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
