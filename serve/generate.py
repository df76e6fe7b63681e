"""CLI: the trained miniature (`checkpoints/mini`) answers a held-out task prompt with LSA; `--compare`
answers the same prompt with the full cache and the same-budget baselines (recency, random).

    python -m serve.generate                                         # niah_single, 4096-token prompt, LSA
    python -m serve.generate --task niah_multivalue --context 8192 --compare
    python -m serve.generate --random-weights --preset tiny --context 4096 --new-tokens 128   # benchmarks

The reduced modes share one device page budget, `--budget` of the CSA pages (recency tail inside,
`serve.engine.LSAConfig.at_budget`); `--kmax-pages` sets it in pages instead. `--ckpt DIR` (a model
directory), or `--params` with `--indexer`, loads another trained model. `--random-weights` keeps the
old benchmark job: a random `--preset` model and Memory Indexer on a random prompt, reporting speed and
KV bytes (`--compare` adds the token agreement with `full`).
"""
from __future__ import annotations

import json
import sys

import jax
import numpy as np

from fm_jax import cli, interop
from fm_jax import kv_tiers as kt
from fm_jax import memory_indexer as mi
from fm_jax.config import PRESETS, get_config
from fm_jax.model import init_params
from fm_jax.prefill import bucket, chunk_multiple
from serve.engine import MODES, LSAConfig, generate
from serve.shipped import SHIPPED, load_model
from train import tasks as T


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _random_indexer(args, config, params):
    if args.indexer:
        try:
            return interop.load_flashmemory_checkpoint(args.indexer)
        except cli.USER_ERRORS as e:  # name the file: the safetensors reader's messages do not
            raise ValueError(f"--indexer {args.indexer}: {e}") from e
    icfg = mi.config_from_model(config)
    try:
        return icfg, mi.init_from_lightning_indexer(icfg, params, config)
    except ValueError:
        return icfg, mi.init_params(icfg, jax.random.PRNGKey(args.seed + 1))


def _with_threshold(indexer, threshold):
    """(IndexerConfig, params) with `--threshold` replacing the checkpoint's keep threshold when given."""
    return indexer if threshold is None else (indexer[0].replace(threshold=threshold), indexer[1])


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


def lsa_config(args, config) -> LSAConfig:
    knobs = dict(stale_by_one=not args.no_stale, verify_recall=args.verify_recall, sink_pages=args.sink_pages)
    if args.kmax_pages is not None:
        tail = args.tail_pages if args.tail_pages is not None else min(LSAConfig.recency_tail_pages, args.kmax_pages)
        return LSAConfig(tau=args.tau, kmax_pages=args.kmax_pages, recency_tail_pages=tail, seed=args.seed, **knobs)
    if args.tail_pages is not None:
        raise ValueError("--tail-pages goes with --kmax-pages (with --budget the tail is --tail-fraction of it)")
    return LSAConfig.at_budget(config, args.context, args.budget, args.tail_fraction, args.tau, args.seed, **knobs)


def _run(args, params, config, indexer, prompt, new_tokens: int, mode: str, lsa: LSAConfig):
    return generate(params, config, prompt, new_tokens, mode=mode, indexer=indexer if mode == "lsa" else None,
                    lsa=lsa, impl=args.impl, prefill_chunk=prefill_chunk(config, args.prefill_chunk, args.context))


def _saving(st) -> str:
    if st["mode"] == "full":
        return f"{_fmt_bytes(st['full_csa_bytes'])} (all)"
    return (f"{_fmt_bytes(st['device_csa_bytes'])} = {100 * st['device_csa_fraction']:.1f}% "
            f"(saves {100 * (1 - st['device_csa_fraction']):.1f}%)")


def run_task(args) -> int:
    """The main job: held-out examples of `--task` answered by the trained model."""
    params, config, indexer = load_model(args.ckpt, args.params, args.indexer)
    indexer = _with_threshold(indexer, args.threshold)
    examples = [T.make_example(args.task, args.context, T.HELDOUT_SEED + args.seed + b) for b in range(args.batch)]
    prompt = np.stack([e.prompt for e in examples])
    new_tokens = args.new_tokens or len(examples[0].answer) + 1
    lsa = lsa_config(args, config)
    modes = [args.mode] + ([m for m in MODES if m != args.mode] if args.compare else [])
    results = {m: _run(args, params, config, indexer, prompt, new_tokens, m, lsa) for m in modes}
    rows = []
    for b, e in enumerate(examples):
        for m in modes:
            gen = np.asarray(results[m].tokens[b])
            score = T.score(args.task, e, gen)
            rows.append({"request": b, "mode": m, "generated": gen.tolist(), "score": score, "correct": score == 1.0})
    if args.json:
        stats = {m: {k: v for k, v in r.stats.items() if k not in ("per_request", "per_cycle")}
                 for m, r in results.items()}
        print(json.dumps({"model": str(args.ckpt or args.params or SHIPPED), "task": args.task,
                          "context": args.context, "kmax_pages": lsa.kmax_pages,
                          "examples": [{"seed": T.HELDOUT_SEED + args.seed + b, "prompt_tail": e.prompt[-16:].tolist(),
                                        "expected": e.answer.tolist(), "depth": e.meta["depth"]}
                                       for b, e in enumerate(examples)],
                          "answers": rows, "stats": stats}, indent=1))
        return 0
    n_pages = kt.csa_pages(config, args.context)
    print(f"fm_jax generate: {args.ckpt or args.params or 'checkpoints/mini'} ({config.name}, trained) "
          f"task={args.task} context={args.context} device={jax.devices()[0].device_kind}")
    print(f"  page budget: {lsa.kmax_pages} of {n_pages} CSA pages per request (recency tail "
          f"{lsa.recency_tail_pages}, sink {lsa.sink_pages}), tau={lsa.tau}")
    for b, e in enumerate(examples):
        q0 = e.meta["question_start"]
        print(f"\n  example {b} (seed HELDOUT_SEED+{args.seed + b}): answer item at depth {e.meta['depth']:.2f}, "
              f"prompt position {int(e.meta['answer_sources'][0])}")
        print(f"    question: {T.describe(e.prompt[q0:])}")
        print(f"    expected: {T.describe(e.answer)}")
        w = max(len(T.describe(r['generated'])) for r in rows if r["request"] == b)
        for r in (r for r in rows if r["request"] == b):
            st = results[r["mode"]].stats
            mark = "correct" if r["correct"] else f"wrong ({r['score']:.2f} of the tokens)"
            print(f"    {r['mode']:<8} {T.describe(r['generated']):<{w}}  {mark:<28} device CSA KV {_saving(st)}")
    return 0


def run_random(args) -> int:
    """The benchmark job: a random `--preset` model on a random prompt (speed and KV bytes)."""
    args.preset = args.preset or "tiny"
    config = get_config(args.preset)
    if args.params:
        from fm_jax.checkpoint import restore_params
        params = restore_params(args.params, config)
    else:
        params = init_params(config, jax.random.PRNGKey(args.seed))
    prompt = jax.random.randint(jax.random.PRNGKey(args.seed + 2), (args.batch, args.context), 0, config.vocab_size)
    lsa = lsa_config(args, config)
    indexer = None
    if args.mode == "lsa":
        indexer = _with_threshold(_random_indexer(args, config, params), args.threshold)
    new_tokens = args.new_tokens or 128
    res = _run(args, params, config, indexer, prompt, new_tokens, args.mode, lsa)
    st = dict(res.stats)
    if args.compare and args.mode != "full":
        full = _run(args, params, config, None, prompt, new_tokens, "full", lsa)
        st["token_agreement_vs_full"] = float(np.mean(full.tokens == res.tokens))
        st["full_decode_tokens_per_s"] = full.stats["decode_tokens_per_s"]
    st.pop("per_request", None)
    if args.json:
        print(json.dumps({"preset": args.preset, "context": args.context, "new_tokens": new_tokens,
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
    print(f"fm_jax generate: random weights, preset={args.preset} context={args.context} new_tokens={new_tokens} "
          f"batch={args.batch} device={jax.devices()[0].device_kind}")
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    for b, toks in enumerate(np.asarray(res.tokens)):
        print(f"  generated tokens (request {b}): {_fmt_tokens(toks)}")
    return 0


def build_parser():
    ap = cli.ArgumentParser(prog="python -m serve.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="niah_single", choices=T.TASKS, help="train.tasks task of the prompt")
    ap.add_argument("--ckpt", type=cli.existing_dir, default=None,
                    help="model directory (backbone/ + memory_indexer.safetensors; default: checkpoints/mini)")
    ap.add_argument("--params", type=cli.existing_dir, help="backbone params (fm_jax.checkpoint), with --indexer")
    ap.add_argument("--indexer", type=cli.existing_file, help="FlashMemory joint .safetensors of the Memory Indexer")
    ap.add_argument("--random-weights", action="store_true",
                    help="benchmark job: random --preset weights (unless --params) on a random prompt")
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS), help="with --random-weights (default tiny)")
    ap.add_argument("--context", type=cli.positive_int, default=4096, help="prompt tokens per request")
    ap.add_argument("--new-tokens", type=cli.positive_int, default=None,
                    help="default: the answer and its EOS (task prompts), 128 (--random-weights)")
    ap.add_argument("--batch", type=cli.positive_int, default=1, help="requests (task prompts: held-out examples)")
    ap.add_argument("--mode", default="lsa", choices=MODES)
    ap.add_argument("--compare", action="store_true",
                    help="also answer in the other modes (--random-weights: token agreement with full)")
    ap.add_argument("--budget", type=cli.float_range(0.0, 1.0, lo_open=True), default=0.1,
                    help="device page budget of lsa / recency / random, a fraction of the CSA pages")
    ap.add_argument("--tail-fraction", type=cli.unit_float, default=0.25, help="recency tail, fraction of the budget")
    ap.add_argument("--kmax-pages", type=cli.positive_int, default=None,
                    help="the budget in pages instead of --budget (tail, sink and written pages inside)")
    ap.add_argument("--tail-pages", type=cli.nonneg_int, default=None, help="recency tail pages (with --kmax-pages)")
    ap.add_argument("--sink-pages", type=cli.nonneg_int, default=LSAConfig.sink_pages)
    ap.add_argument("--tau", type=cli.positive_int, default=LSAConfig.tau)
    ap.add_argument("--threshold", type=cli.unit_float, default=None,
                    help="Memory Indexer keep threshold (default: the indexer's own)")
    ap.add_argument("--no-stale", action="store_true", help="recall synchronously at each boundary")
    ap.add_argument("--verify-recall", action="store_true", help="checksum every page recalled from the host")
    ap.add_argument("--seed", type=cli.nonneg_int, default=0,
                    help="held-out example (seed HELDOUT_SEED + seed); random weights / prompt; mode=random's pages")
    ap.add_argument("--impl", default="auto", choices=("auto", "pallas", "xla"))
    ap.add_argument("--prefill-chunk", type=int, default=8192,
                    help="prefill the prompt in chunks of this many tokens (rounded down to the config's chunk "
                         "granularity, at most the padded prompt; LSA modes stream CSA entries to the host "
                         "during prefill); 0 = the whole prompt at once")
    ap.add_argument("--json", action="store_true", help="print the answers and stats as JSON")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.random_weights:
        if args.ckpt:
            raise ValueError("--random-weights takes --preset (and optionally --params), not --ckpt")
        return run_random(args)
    if args.preset:
        raise ValueError("--preset goes with --random-weights (a trained model's config comes with its checkpoint)")
    return run_task(args)


if __name__ == "__main__":
    sys.exit(cli.run(main))
