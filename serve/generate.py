"""CLI: prefill a synthetic prompt and decode with the full cache or with LSA; print a short table.

    python -m serve.generate --preset tiny --context 4096 --new-tokens 128 --mode lsa [--json]

Weights are random unless `--params` (an orbax checkpoint from fm_jax.checkpoint) and `--indexer`
(a FlashMemory joint .safetensors) are given; a random Memory Indexer starts from the backbone's
Lightning Indexer where the dims match.
"""
from __future__ import annotations

import json
import sys

import jax
import numpy as np

from fm_jax import cli, interop
from fm_jax import memory_indexer as mi
from fm_jax.config import PRESETS, get_config
from fm_jax.model import init_params
from fm_jax.prefill import bucket, chunk_multiple
from serve.engine import MODES, LSAConfig, generate


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _indexer(args, config, params):
    if args.indexer:
        try:
            icfg, iparams = interop.load_flashmemory_checkpoint(args.indexer)
        except cli.USER_ERRORS as e:  # name the file: the safetensors reader's messages do not
            raise ValueError(f"--indexer {args.indexer}: {e}") from e
    else:
        icfg = mi.config_from_model(config)
        try:
            iparams = mi.init_from_lightning_indexer(icfg, params, config)
        except ValueError:
            iparams = mi.init_params(icfg, jax.random.PRNGKey(args.seed + 1))
    return (icfg if args.threshold is None else icfg.replace(threshold=args.threshold)), iparams


def _fmt_tokens(tokens, limit: int = 32) -> str:
    shown = " ".join(str(int(t)) for t in tokens[:limit])
    return shown + (f" ... ({len(tokens)} tokens)" if len(tokens) > limit else "")


def prefill_chunk(config, requested: int, context: int) -> int | None:
    """The chunk `generate` gets: None for 0 (whole prompt), else `requested` rounded down to the config's
    granularity (at least one unit) and no larger than the prompt rounded up to that granularity."""
    if requested < 0:
        raise ValueError(f"--prefill-chunk must be >= 0, got {requested}")
    if requested == 0:
        return None
    m = chunk_multiple(config)
    return min(max(requested // m, 1) * m, bucket(context, m))


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="python -m serve.generate", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--context", type=cli.positive_int, default=4096, help="prompt tokens per request")
    ap.add_argument("--new-tokens", type=cli.positive_int, default=128)
    ap.add_argument("--batch", type=cli.positive_int, default=1)
    ap.add_argument("--mode", default="lsa", choices=MODES)
    ap.add_argument("--compare", action="store_true", help="also run mode=full and report token agreement")
    ap.add_argument("--tau", type=cli.positive_int, default=LSAConfig.tau)
    ap.add_argument("--threshold", type=cli.unit_float, default=None,
                    help="Memory Indexer keep threshold (default: the indexer's own)")
    ap.add_argument("--kmax-pages", type=cli.positive_int, default=LSAConfig.kmax_pages,
                    help="resident pages per request (recency tail, sink and written pages inside)")
    ap.add_argument("--tail-pages", type=cli.nonneg_int, default=LSAConfig.recency_tail_pages)
    ap.add_argument("--sink-pages", type=cli.nonneg_int, default=LSAConfig.sink_pages)
    ap.add_argument("--no-stale", action="store_true", help="recall synchronously at each boundary")
    ap.add_argument("--verify-recall", action="store_true", help="checksum every page recalled from the host")
    ap.add_argument("--params", type=cli.existing_dir, help="orbax checkpoint of backbone params (fm_jax.checkpoint)")
    ap.add_argument("--indexer", type=cli.existing_file, help="FlashMemory joint .safetensors of the Memory Indexer")
    ap.add_argument("--seed", type=cli.nonneg_int, default=0)
    ap.add_argument("--impl", default="auto", choices=("auto", "pallas", "xla"))
    ap.add_argument("--prefill-chunk", type=int, default=8192,
                    help="prefill the prompt in chunks of this many tokens (rounded down to the config's chunk "
                         "granularity, at most the padded prompt; LSA modes stream CSA entries to the host "
                         "during prefill); 0 = the whole prompt at once")
    ap.add_argument("--json", action="store_true", help="print the stats as JSON")
    args = ap.parse_args(argv)

    config = get_config(args.preset)
    if args.params:
        from fm_jax.checkpoint import restore_params
        params = restore_params(args.params, config)
    else:
        params = init_params(config, jax.random.PRNGKey(args.seed))
    prompt = jax.random.randint(jax.random.PRNGKey(args.seed + 2), (args.batch, args.context), 0, config.vocab_size)
    lsa = LSAConfig(tau=args.tau, kmax_pages=args.kmax_pages, recency_tail_pages=args.tail_pages,
                    sink_pages=args.sink_pages, stale_by_one=not args.no_stale, verify_recall=args.verify_recall,
                    seed=args.seed)
    indexer = _indexer(args, config, params) if args.mode == "lsa" else None
    chunk = prefill_chunk(config, args.prefill_chunk, args.context)
    res = generate(params, config, prompt, args.new_tokens, mode=args.mode, indexer=indexer, lsa=lsa, impl=args.impl,
                   prefill_chunk=chunk)
    st = dict(res.stats)
    if args.compare and args.mode != "full":
        full = generate(params, config, prompt, args.new_tokens, mode="full", lsa=lsa, impl=args.impl,
                        prefill_chunk=chunk)
        st["token_agreement_vs_full"] = float(np.mean(full.tokens == res.tokens))
        st["full_decode_tokens_per_s"] = full.stats["decode_tokens_per_s"]
    st.pop("per_request", None)
    if args.json:
        print(json.dumps({"preset": args.preset, "context": args.context, "new_tokens": args.new_tokens,
                          "device": str(jax.devices()[0].device_kind), **st,
                          "tokens": np.asarray(res.tokens).tolist()}, indent=2))
        return 0
    rows = [
        ("mode", st["mode"]),
        ("decode tokens/s",
         f"{st['decode_tokens_per_s']:.1f}  (first window incl. compile: {st['first_window_s']:.1f} s)"),
        ("device KV (all layers)", f"{_fmt_bytes(st['device_kv_bytes'])}  vs full {_fmt_bytes(st['full_kv_bytes'])}"
                                   f"  = {st['device_kv_fraction']:.3f}"),
        ("device CSA KV", f"{_fmt_bytes(st['device_csa_bytes'])}  vs full {_fmt_bytes(st['full_csa_bytes'])}"
                          f"  = {st['device_csa_fraction']:.3f}"),
        ("resident fraction (CSA entries)", f"{st['resident_fraction']:.3f}"),
        ("recalled", f"{_fmt_bytes(st['recalled_bytes'])} over {st['cycles']} cycles"),
        ("time: prefill / scoring / recall / write-through",
         f"{st['prefill_s']:.2f} / {st['scoring_s']:.3f} / {st['recall_s']:.3f} / {st['write_through_s']:.3f} s"),
    ]
    if "token_agreement_vs_full" in st:
        rows.append(("token agreement vs full", f"{st['token_agreement_vs_full']:.3f}"))
    w = max(len(k) for k, _ in rows)
    print(f"fm_jax generate: preset={args.preset} context={args.context} new_tokens={args.new_tokens} "
          f"batch={args.batch} device={jax.devices()[0].device_kind}")
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    for b, toks in enumerate(np.asarray(res.tokens)):
        print(f"  generated tokens (request {b}): {_fmt_tokens(toks)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
