"""The LSA decode engine (SPEC §5): prefill, then windows of `tau` decode steps.

Each window runs as one jitted `lax.scan` (no host sync inside). At a cycle boundary the Memory
Indexer scores the full history of its target layers' index keys; each page scores the number of its
entries with score >= threshold, and the resident set is the release's: exactly
K = min(kmax_pages, candidate pages) pages, the pages the window writes, the sink and the recency tail
first (page score +inf), then the best-scoring pages (`kv_tiers.select_pages`). The engine recalls
from the host mirror only the pages not already in the device reserve (LRU) and hands the decode step
its page tables. With `stale_by_one` the pages for window n+1 are chosen and their transfer issued at
boundary n, before window n runs, so the copy overlaps compute; the last window starts no recall.

Modes: "full" (the plain backbone, whole CSA cache on the device), "lsa" (Memory Indexer), and the
paper's same-budget baselines "recency" (newest pages) and "random" (uniform pages).
"""
from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from fm_jax import backbone
from fm_jax import kv_tiers as kt
from fm_jax import memory_indexer as mi
from fm_jax.cache import kv_zeros, n_visible_entries
from fm_jax.config import KIND_CSA, KIND_HCA
from fm_jax.model import check_prefill_inputs, prefill_with_hidden
from fm_jax.sharding import (
    batch_sharding,
    check_batch,
    constrain,
    replicate,
    shard_batch,
    shard_cache,
    shard_params,
    use_mesh,
)
from serve.prefill import chunked_prefill

MODES = ("full", "lsa", "recency", "random")


@dataclass(frozen=True)
class LSAConfig:
    """Cycle and page budget of the tiered CSA cache. The keep `threshold` and the layer `ensemble` are
    the Memory Indexer's own (`IndexerConfig.threshold` / `.ensemble`, stored in its checkpoint); to
    change them pass `indexer=(icfg.replace(threshold=...), params)`."""
    tau: int = 64                  # decode steps per cycle
    kmax_pages: int = 64           # K_max: resident pages per request (tail, sink and written pages inside)
    page_entries: int | None = None  # CSA entries per page; None = the model config's page_entries
    recency_tail_pages: int = 32   # newest complete pages always resident (inside kmax_pages)
    sink_pages: int = 0            # first pages always resident (inside kmax_pages)
    stale_by_one: bool = True      # choose window n+1's pages at boundary n (transfer overlaps compute)
    verify_recall: bool = False    # checksum recalled pages (opt-in: ~3% of a window on CPU, see README)
    host_mirror: str = "numpy"     # the host mirror's arrays: "numpy" or "pinned" (pinned_host JAX arrays,
                                   # recalled by a jitted gather: `kv_pinned`); see benchmarks/bench_recall.py
    seed: int = 0                  # for mode="random"

    def __post_init__(self):
        for name in ("tau", "kmax_pages"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"LSAConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("recency_tail_pages", "sink_pages"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"LSAConfig.{name} must be a non-negative int, got {getattr(self, name)!r}")
        if self.page_entries is not None and (not isinstance(self.page_entries, int) or self.page_entries <= 0):
            raise ValueError(f"LSAConfig.page_entries must be a positive int, got {self.page_entries!r}")
        if self.host_mirror not in kt.MIRROR_BACKENDS:
            raise ValueError(f"LSAConfig.host_mirror must be one of {kt.MIRROR_BACKENDS}, got {self.host_mirror!r}")

    @classmethod
    def at_budget(cls, config, length: int, budget: float, tail_fraction: float = 0.25, tau: int = 64,
                  seed: int = 0, **fields) -> LSAConfig:
        """The page budget of the paper's same-budget comparisons at a `length`-token context: `budget` (a
        fraction in (0, 1]) of the CSA pages, at least the pages one window writes, with the recency tail a
        `tail_fraction` of it (the release's production ratio is 32 of 96 pages); no sink unless `fields`
        name one (`fields`: the other LSAConfig fields)."""
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget must be a fraction in (0, 1], got {budget!r}")
        if not 0.0 <= tail_fraction <= 1.0:
            raise ValueError(f"tail_fraction must be in [0, 1], got {tail_fraction!r}")
        kmax = max(kt.window_write_pages(config, tau), int(budget * kt.csa_pages(config, length)))
        return cls(tau=tau, kmax_pages=kmax, recency_tail_pages=int(tail_fraction * kmax), seed=seed,
                   **{"sink_pages": 0, **fields})


@dataclass
class GenerateResult:
    tokens: np.ndarray             # [B, n] int32
    logits: np.ndarray | None      # [B, n, V] float32 when asked
    stats: dict
    # with trace_resident: per window, the page table it decoded with, page_slot int32 [B, n_pages]
    # (reserve slot of each resident page, -1 = not resident)
    resident_tables: list | None = None


# ------------------------------------------------------------------------------------------ jitted
@functools.partial(jax.jit, static_argnames=("config", "n_steps", "greedy", "return_logits", "impl",
                                             "hidden_layers", "mesh"), donate_argnames=("cache",))
def run_window(params, config, cache, token, key, n_steps: int, greedy: bool, return_logits: bool, impl: str,
               hidden_layers: tuple, mesh=None):
    """`n_steps` decode steps as one scan, feeding back the chosen token.
    token [B] -> (cache, next token [B], tokens [n_steps, B], logits [n_steps, B, V] or None,
    hidden of `hidden_layers` at the last step {layer: [B, d_model]}, key).
    With a ("data", "model") `mesh`, the per-request carry (cache, token, hidden) stays split over
    ``data`` and whole over ``model`` (`sharding.constrain`); parameters keep their own shardings."""
    b = token.shape[0]
    pin = functools.partial(constrain, mesh=mesh, batch=b)

    def step(carry, _):
        cache, tok, key, _ = carry
        logits, cache, hidden = backbone.run_step(params, config, cache, tok, impl=impl)
        key, sub = jax.random.split(key)
        nxt = jnp.argmax(logits, -1) if greedy else jax.random.categorical(sub, logits)
        nxt = nxt.astype(jnp.int32)
        last = {l: hidden[l] for l in hidden_layers}
        cache, nxt, last = pin((cache, nxt, last))
        return (cache, nxt, key, last), (nxt, logits if return_logits else None)

    init_hidden = {l: jnp.zeros((b, config.d_model), params["embed"].dtype) for l in hidden_layers}
    (cache, tok, key, last), (toks, logits) = jax.lax.scan(step, (cache, token, key, pin(init_hidden)), None,
                                                          length=n_steps)
    return cache, tok, toks, logits, last, key


@functools.partial(jax.jit, static_argnames=("page_entries", "mesh"), donate_argnames=("layers",))
def _apply_recall(layers, staged, slots, page_entries: int, mesh=None):
    """Scatter staged pages into every CSA layer's reserve. layers: {l: (kv [B, cells, kv_row], keys
    [B, n_slots, page_bytes])}, staged: {l: (kv [B, M, P, kv_row], keys [B, M, page_bytes])}, slots [B, M]
    (n_slots = padding, dropped). A page of index keys is one contiguous blob (`key_pages`)."""
    out = {}
    bidx = jnp.arange(slots.shape[0])[:, None]
    for l, (kv, keys) in layers.items():
        b, cells = kv.shape[:2]
        n_slots = cells // page_entries
        skv, skeys = staged[l]
        kv = kv.reshape(b, n_slots, page_entries, -1).at[bidx, slots].set(skv.astype(kv.dtype), mode="drop")
        out[l] = (kv.reshape(b, cells, -1), keys.at[bidx, slots].set(skeys, mode="drop"))
    return constrain(out, mesh, slots.shape[0])  # the reserve keeps the cache's sharding


@functools.partial(jax.jit, static_argnames=("page_entries",))
def _read_slots(layers, slots, page_entries: int):
    """Gather reserve pages for write-through: {l: (kv [B, cells, kv_row], keys [B, n_slots, page_bytes])},
    slots [B, M] -> {l: (kv [B, M, P, kv_row], keys [B, M, page_bytes])}."""
    bidx = jnp.arange(slots.shape[0])[:, None]
    out = {}
    for l, (kv, keys) in layers.items():
        b, cells = kv.shape[:2]
        out[l] = (kv.reshape(b, cells // page_entries, page_entries, -1)[bidx, slots], keys[bidx, slots])
    return out


@functools.partial(jax.jit, static_argnames=("mesh",), donate_argnames=("full_keys",))
def _update_full_keys(full_keys, pages_keys, pages, mesh=None):
    """Write pages [B, M] (-1 = skip) of index keys into the device copy of a target layer's keys
    [B, n_pages, page_bytes]."""
    b, n_pages = full_keys.shape[:2]
    bidx = jnp.arange(b)[:, None]
    return constrain(full_keys.at[bidx, jnp.where(pages >= 0, pages, n_pages)].set(pages_keys, mode="drop"), mesh, b)


# ------------------------------------------------------------------------------------------ bytes
def kv_bytes(config, n_tokens: np.ndarray, *, reserve_cells: int | None = None, target_layers=()) -> dict:
    """Device KV bytes per request for contexts of `n_tokens` [B]: full cache, or with the CSA layers
    holding `reserve_cells` cells each plus the full index keys of the Memory Indexer's target layers."""
    kv_b, key_b = config.kv_entry_bytes, config.index_key_bytes
    n_tokens = np.asarray(n_tokens, np.int64)
    window = np.full_like(n_tokens, 0)
    hca = np.zeros_like(n_tokens)
    csa_full = np.zeros_like(n_tokens)
    for l in range(config.n_layers):
        window += np.minimum(n_tokens, config.window) * kv_b
        kind = config.layer_kind(l)
        if kind == KIND_HCA:
            hca += n_tokens // config.compress_ratios[l] * kv_b
        elif kind == KIND_CSA:
            csa_full += n_tokens // config.csa_ratio * (kv_b + key_b)
    if reserve_cells is None:
        csa_dev = csa_full
    else:
        n_csa = len(config.csa_layers)
        csa_dev = np.full_like(n_tokens, reserve_cells * (kv_b + key_b) * n_csa)
        csa_dev += n_tokens // config.csa_ratio * key_b * len(target_layers)
    return {"window": window, "hca": hca, "csa_full": csa_full, "csa_device": csa_dev,
            "full": window + hca + csa_full, "device": window + hca + csa_dev}


# ------------------------------------------------------------------------------------------ engine
def _check_generate(config, mode, indexer, lsa, max_new_tokens):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if mode != "full" and not config.csa_layers:
        raise ValueError(f"mode={mode!r} needs CSA layers; config has compress_ratios={config.compress_ratios}")
    if mode == "lsa":
        if indexer is None:
            raise ValueError("mode='lsa' needs indexer=(indexer_config, indexer_params)")
        icfg, iparams = indexer
        for l in icfg.target_layers:
            if l >= config.n_layers or config.layer_kind(l) != KIND_CSA:
                raise ValueError(f"Memory Indexer target layer {l} is not a CSA layer of the model")
            if f"l{l}" not in iparams:
                raise ValueError(f"indexer params have no scorer 'l{l}'")
        if icfg.head_dim != config.index_head_dim:
            raise ValueError(f"indexer head_dim={icfg.head_dim} != model index_head_dim={config.index_head_dim}")


def _under_mesh(f):
    """Run `f(..., mesh=mesh)` with `mesh` as the context mesh (sparse MoE splits experts over it)."""
    @functools.wraps(f)
    def run(*args, mesh=None, **kwargs):
        with use_mesh(mesh):
            return f(*args, mesh=mesh, **kwargs)
    return run


@_under_mesh
def generate(params, config, prompt, max_new_tokens: int, mode: str = "full", indexer=None,
             lsa: LSAConfig = LSAConfig(), greedy: bool = True, return_logits: bool = False, *,
             lengths=None, key=None, impl: str = "auto", trace_resident: bool = False, stream=None,
             prefill_chunk: int | None = None, mesh=None) -> GenerateResult:
    """Prefill `prompt` [B, T] (right-padded with `lengths` [B] when ragged) and generate
    `max_new_tokens` tokens per request. Returns `.tokens` [B, n], `.logits` [B, n, V] (when
    `return_logits`), `.stats` (bytes and times; see README) and, with `trace_resident`,
    `.resident_tables` (per window, the page table it decoded with). `stream`: see `decode_loop`.
    `prefill_chunk`: run the prompt in chunks of that many tokens (`serve.prefill`; the cache capacity is
    rounded up to a multiple of it, and in the tiered modes the CSA entries stream to the host mirror
    during prefill). `mesh`: a ("data", "model") mesh (`fm_jax.sharding.make_mesh`) to run on; see
    `decode_loop`."""
    if lsa.page_entries is not None and lsa.page_entries != config.page_entries:
        config = config.replace(page_entries=lsa.page_entries)
    _check_generate(config, mode, indexer, lsa, max_new_tokens)
    prompt = jnp.asarray(prompt)
    # every window runs the full tau steps (one compilation); room for the tokens past the request
    max_len = prompt.shape[1] + 1 + -(-(max_new_tokens - 1) // lsa.tau) * lsa.tau
    lengths = check_prefill_inputs(config, prompt, max_len, lengths)
    if mesh is not None:
        check_batch(mesh, prompt.shape[0])
        if prefill_chunk is not None:  # its MirrorStore keeps the CSA scratch buffers on one device
            raise ValueError("prefill_chunk is not supported with a mesh yet: pass prefill_chunk=None")
        params = shard_params(params, config, mesh)
        prompt, lengths = shard_batch(prompt, mesh), shard_batch(lengths, mesh)
    if mode != "full":  # a budget that cannot work fails here, not after the prefill
        kt.make_layout(config, max_len, kmax_pages=lsa.kmax_pages, recency_tail_pages=lsa.recency_tail_pages,
                       sink_pages=lsa.sink_pages, tau=lsa.tau)
    key = jax.random.PRNGKey(0) if key is None else key

    t0 = time.perf_counter()
    mirror = None
    if prefill_chunk is not None:
        targets = tuple(indexer[0].target_layers) if mode == "lsa" else ()
        last_logits, cache, hidden, mirror = chunked_prefill(params, config, prompt, lengths, max_len, prefill_chunk,
                                                             tiered=mode != "full", target_layers=targets, impl=impl)
    else:
        logits0, cache, hidden = prefill_with_hidden(params, config, prompt, lengths, max_len, impl)
        last_logits = jnp.take_along_axis(logits0, (lengths - 1)[:, None, None], axis=1)[:, 0]
    key, sub = jax.random.split(key)
    token = (jnp.argmax(last_logits, -1) if greedy else jax.random.categorical(sub, last_logits)).astype(jnp.int32)
    token.block_until_ready()
    prefill_s = time.perf_counter() - t0

    res = decode_loop(params, config, cache, token, hidden, max_new_tokens, mode=mode, indexer=indexer, lsa=lsa,
                      greedy=greedy, return_logits=return_logits, key=key, impl=impl,
                      first_logits=last_logits if return_logits else None, trace_resident=trace_resident,
                      stream=stream, mirror=mirror, mesh=mesh)
    res.stats["prefill_s"] = prefill_s
    res.stats["prefill_chunk"] = prefill_chunk
    return res


@_under_mesh
def decode_loop(params, config, cache, token, hidden, max_new_tokens: int, *, mode: str = "full", indexer=None,
                lsa: LSAConfig = LSAConfig(), greedy: bool = True, return_logits: bool = False, key=None,
                impl: str = "auto", first_logits=None, trace_resident: bool = False, stream=None,
                mirror=None, mesh=None) -> GenerateResult:
    """Decode from a prefilled (entry-indexed) cache whose next token is `token` [B]; `hidden[l]` is
    layer l's hidden state [B, d_model] at the last cached token (the first Memory Indexer query).
    The cache needs room for `1 + ceil((max_new_tokens - 1) / tau) * tau` more tokens.
    `stream(window, tokens [B, tau], logits [B, tau, V] or None)`, when given, receives every window's
    outputs (NumPy) instead of the result (whose tokens are then only `token`): long generations keep
    no growing output on the host. `mirror`: a HostMirror already holding every CSA entry (chunked
    prefill), else it is copied from the cache.
    `mesh`: a ("data", "model") mesh (`fm_jax.sharding.make_mesh`): requests split over ``data`` (the
    batch must be a multiple of it; ValueError otherwise), heads and experts over ``model``
    (`sharding.param_spec`); each data shard's pages are recalled from the host mirror straight onto the
    devices that own its requests. Tokens equal those of one device; logits differ by reduction order."""
    _check_generate(config, mode, indexer, lsa, max_new_tokens)
    key = jax.random.PRNGKey(0) if key is None else key
    b = token.shape[0]
    if mesh is None:
        # Commit every input to its placement: jit keys its cache on committedness, and the scan's outputs
        # are committed, so uncommitted prefill outputs would cost a second compilation of the window.
        cache, token, key = jax.tree_util.tree_map(lambda x: jax.device_put(x, x.sharding), (cache, token, key))
    else:  # the placements every jitted step keeps (a no-op for inputs already placed so)
        check_batch(mesh, b)
        params, cache = shard_params(params, config, mesh), shard_cache(cache, config, mesh)
        token, key = shard_batch(token, mesh), replicate(key, mesh)
        if indexer is not None:
            indexer = (indexer[0], replicate(indexer[1], mesh))
    times = {"prefill_s": 0.0, "scoring_s": 0.0, "recall_s": 0.0, "recall_landed_s": 0.0, "decode_s": 0.0,
             "write_through_s": 0.0, "first_window_s": 0.0}
    n_windows_total = -(-(max_new_tokens - 1) // lsa.tau)
    max_len = int(cache["capacity"])
    last = int(np.max(np.asarray(cache["lengths"]))) + n_windows_total * lsa.tau
    if last > max_len:
        raise ValueError(f"the cache holds max_len={max_len} tokens but decoding {max_new_tokens} tokens in windows "
                         f"of tau={lsa.tau} reaches position {last - 1}")
    icfg, iparams = indexer if mode == "lsa" else (None, None)
    hidden_layers = tuple(icfg.target_layers) if icfg is not None else ()
    hidden = {l: hidden[l] if mesh is None else shard_batch(hidden[l], mesh) for l in hidden_layers}
    cycle = _Cycle(config, cache, lsa, mode, icfg, iparams, max_len, impl, mirror, mesh) if mode != "full" else None
    if cycle is not None:
        cache = cycle.cache
    pos = np.asarray(cache["lengths"]).astype(np.int64)  # position of the next token (= tokens held)
    out_tokens = [np.asarray(token)]
    out_logits = [np.asarray(first_logits)] if first_logits is not None else []
    resident_tables = [] if trace_resident and cycle is not None else None
    n = lsa.tau
    for n_windows in range(n_windows_total):
        has_next = n_windows + 1 < n_windows_total  # the last window starts no recall for a window after it
        if cycle is not None:
            cache = cycle.boundary(cache, hidden, pos, n, times, has_next)
            if resident_tables is not None:
                resident_tables.append(cycle.tables_host.copy())
        t0 = time.perf_counter()
        cache, token, toks, logits, hidden, key = run_window(params, config, cache, token, key, n, greedy,
                                                             return_logits, impl, hidden_layers, mesh)
        if cycle is not None and has_next:  # host gather + H2D for the next window run while this one computes
            cycle.prepare_next(pos + n, times)
        toks.block_until_ready()
        # the first window includes compilation: kept apart so tokens/s is the steady state
        times["first_window_s" if n_windows == 0 else "decode_s"] += time.perf_counter() - t0
        if stream is not None:
            stream(n_windows, np.asarray(toks).T, np.asarray(logits).transpose(1, 0, 2) if return_logits else None)
        else:
            out_tokens.append(np.asarray(toks).T)
            if return_logits:
                out_logits.append(np.asarray(logits).transpose(1, 0, 2))
        if cycle is not None:
            cache = cycle.after_window(cache, pos, n, times)
            cycle.record(times)
        pos = pos + n
    tokens = np.concatenate([out_tokens[0][:, None]] + out_tokens[1:], axis=1)[:, :max_new_tokens]
    logits = None
    if return_logits and out_logits:
        logits = np.concatenate([out_logits[0][:, None]] + out_logits[1:], axis=1)[:, :max_new_tokens]
    stats = _stats(config, mode, cycle, pos, times, n_windows_total, b, lsa.tau, icfg)
    return GenerateResult(tokens, logits, stats, resident_tables)


def _stats(config, mode, cycle, pos, times, n_windows, batch, tau, icfg):
    if cycle is None:
        by = kv_bytes(config, pos)
        recalled, resident_fraction = 0, 1.0
    else:
        by = kv_bytes(config, pos, reserve_cells=cycle.layout.n_cells,
                      target_layers=icfg.target_layers if icfg is not None else ())
        recalled = cycle.recalled_pages * kt.page_bytes(config)
        resident_fraction = float(np.mean(cycle.resident_fractions)) if cycle.resident_fractions else 1.0
    steady_windows = n_windows - 1  # decode_s excludes the first window (compilation)
    decode_tokens = batch * tau * steady_windows
    st = {
        "mode": mode, "batch": batch, "context_end": pos.tolist(),
        "device_kv_bytes": int(by["device"].sum()), "full_kv_bytes": int(by["full"].sum()),
        "device_csa_bytes": int(by["csa_device"].sum()), "full_csa_bytes": int(by["csa_full"].sum()),
        "device_kv_fraction": float(by["device"].sum() / by["full"].sum()),
        "device_csa_fraction": float(by["csa_device"].sum() / max(by["csa_full"].sum(), 1)),
        "resident_fraction": resident_fraction, "recalled_bytes": int(recalled),
        "cycles": n_windows, **{k: float(v) for k, v in times.items()},
        "decode_tokens_per_s": decode_tokens / times["decode_s"] if steady_windows > 0 else float("nan"),
        "per_request": {"device_kv_bytes": by["device"].tolist(), "full_kv_bytes": by["full"].tolist()},
    }
    if cycle is not None:
        st["reserve_pages"] = cycle.layout.n_slots
        pb = kt.page_bytes(config)
        st["per_cycle"] = [{**{k: v for k, v in pc.items() if k != "recalled_pages"},
                            "recalled_bytes": pc["recalled_pages"] * pb} for pc in cycle.per_cycle]
        st["host_mirror_bytes"] = cycle.mirror.nbytes()
    return st


@functools.cache
def _watcher() -> ThreadPoolExecutor:
    """One thread that waits for recalled pages to land (apart from the gather pool, which it would block)."""
    return ThreadPoolExecutor(1, thread_name_prefix="fm-recall-landed")


class _Cycle:
    """Host-side state of the tiered CSA cache across cycle boundaries."""

    def __init__(self, config, cache, lsa, mode, icfg, iparams, max_len, impl, mirror=None, mesh=None):
        self.c, self.lsa, self.mode, self.icfg, self.iparams, self.impl = config, lsa, mode, icfg, iparams, impl
        self.mesh = mesh
        b = cache["lengths"].shape[0]
        # per-request host -> device inputs (recalled pages, page tables, slots) go to the data shard that
        # owns each request; None = the default device
        self.rows = None if mesh is None else batch_sharding(mesh, (b,))
        self.layout = kt.make_layout(config, max_len, kmax_pages=lsa.kmax_pages,
                                     recency_tail_pages=lsa.recency_tail_pages, sink_pages=lsa.sink_pages,
                                     tau=lsa.tau)
        if mirror is None:
            self.mirror = kt.HostMirror.from_cache(cache, config, self.layout, verify=lsa.verify_recall,
                                                   backend=lsa.host_mirror, sharding=self.rows)
        else:  # streamed during a chunked prefill (NumPy)
            self.mirror = mirror.to_backend(lsa.host_mirror, self.rows)
            if lsa.verify_recall:
                self.mirror.start_verifying()
        # Target layers' index keys stay whole on the device: the Memory Indexer scores all of them.
        self.full_keys = {} if icfg is None else {l: cache["layers"][l]["index_keys"] for l in icfg.target_layers}
        layers = list(cache["layers"])
        for l in config.csa_layers:  # the full CSA buffers leave the device; an empty reserve replaces them
            lc = dict(layers[l])
            # committed like the arrays the window returns (jit keys its cache on committedness)
            lc["comp_kv"] = jax.device_put(kv_zeros(config, b, self.layout.n_cells), lc["comp_kv"].sharding)
            lc["index_keys"] = jax.device_put(jnp.zeros((b, self.layout.n_slots, config.index_page_bytes), jnp.uint8),
                                              lc["index_keys"].sharding)
            layers[l] = lc
        self.state = kt.ReserveState.empty(b, self.layout)
        self.cache = self._compile_recall_shapes({**cache, "layers": tuple(layers)})
        self.cache["tier"] = self._tables()
        self.rng = np.random.default_rng(lsa.seed)
        self.staged = None           # (plan, device arrays, tables) of the next window, with stale_by_one
        self.next_scores = None      # page scores chosen at this boundary for the next window (stale_by_one)
        self.tables_host = None      # page_slot of the window that just ran (for write-through)
        self.recalled_pages = 0
        self.resident_fractions = []
        self.per_cycle = []          # scoring / recall / write-through seconds and recalled pages per cycle
        self._last = None
        self._landing = []           # futures: seconds from a recall's start until its arrays are on the device

    def _compile_recall_shapes(self, cache):
        """Run the reserve scatter once for every recall bucket, writing nothing (every slot is the
        dropped padding slot), so that no window after the first triggers a compilation."""
        b, p = cache["lengths"].shape[0], self.layout.page_entries
        for m in kt.recall_buckets(self.layout.n_slots):
            lcs = {l: cache["layers"][l] for l in self.c.csa_layers}
            staged = {l: (kt.to_device(np.zeros((b, m, p, lc["comp_kv"].shape[-1]), lc["comp_kv"].dtype), self.rows),
                          kt.to_device(np.zeros((b, m, lc["index_keys"].shape[-1]), np.uint8), self.rows))
                      for l, lc in lcs.items()}
            plan = kt.RecallPlan(np.full((b, m), self.layout.n_slots, np.int64), np.zeros((b, m), np.int64), 0)
            cache = self._apply(cache, plan, staged, None)
            self.mirror.compile_recall(plan, self.rows)  # the "pinned" mirror's gather is a jitted program
        return cache

    def _put(self, x) -> jax.Array:
        """A small per-request host array [B, ...] on the devices of its requests."""
        return jnp.asarray(x) if self.rows is None else jax.device_put(np.asarray(x), self.rows)

    def _tables(self):
        """The decode cache's `tier` for the current reserve state, placed like the cache."""
        return {k: self._put(v) for k, v in kt.device_tables(self.state, self.layout).items()}

    def record(self, times):
        # a transfer still running after the window would stall the next boundary anyway: wait for it here
        times["recall_landed_s"] += sum(f.result() for f in self._landing)
        self._landing = []
        now = {k: times[k] for k in ("scoring_s", "recall_s", "recall_landed_s", "write_through_s")}
        now["recalled_pages"] = self.recalled_pages
        prev = self._last or {k: 0 for k in now}
        self.per_cycle.append({k: now[k] - prev[k] for k in now})
        self._last = now

    # -- page choice
    def _page_scores(self, hidden, pos, times):
        """Per request, a score per page [n_pages] (higher = keep first) from the state at `pos`."""
        p, r, n_pages = self.layout.page_entries, self.layout.ratio, self.layout.n_pages
        if self.mode == "lsa":
            n_complete = n_visible_entries(pos - 1, r)  # entries the query (the last cached token) sees
            t0 = time.perf_counter()
            scores = mi.ensemble_scores(
                mi.score_all(self.iparams, self.icfg, hidden, self.full_keys, self._put(np.asarray(pos - 1, np.int32)),
                             self._put(np.asarray(n_complete, np.int32)), impl=self.impl, page_entries=p),
                self.icfg.ensemble)
            scores = np.asarray(scores)
            times["scoring_s"] += time.perf_counter() - t0
            return [kt.page_counts(scores[b], int(n_complete[b]), self.icfg.threshold, p, n_pages)
                    for b in range(len(pos))]
        if self.mode == "recency":
            return [kt.page_scores_recency(n_pages) for _ in pos]
        return [kt.page_scores_random(n_pages, self.rng) for _ in pos]

    def _plan(self, page_scores, pos, n_steps):
        wanted = [kt.select_pages(sc, int(q), self.layout, n_steps, self.lsa.kmax_pages)
                  for sc, q in zip(page_scores, pos)]
        written_pages = -(-(pos // self.layout.ratio) // self.layout.page_entries)
        self.state, plan = kt.plan_recall(self.state, wanted, self.layout, written_pages)
        tables = self._tables()
        staged = None
        if plan.pages.shape[1]:
            t0 = time.perf_counter()
            staged = self.mirror.recall_to_device(plan, self.rows)
            # `recall_s` stops when the copies are dispatched; a watcher times their landing, off this thread
            self._landing.append(_watcher().submit(
                lambda a=staged, t0=t0: (jax.block_until_ready(a), time.perf_counter() - t0)[1]))
        self.recalled_pages += plan.n_pages * len(self.c.csa_layers)
        return plan, staged, tables

    def _apply(self, cache, plan, staged, tables):
        layers = list(cache["layers"])
        if staged is not None:
            res = _apply_recall({l: (layers[l]["comp_kv"], layers[l]["index_keys"]) for l in self.c.csa_layers},
                                staged, self._put(plan.slots.astype(np.int32)), self.layout.page_entries, self.mesh)
            for l, (kv, keys) in res.items():
                layers[l] = {**layers[l], "comp_kv": kv, "index_keys": keys}
        return {**cache, "layers": tuple(layers), **({"tier": tables} if tables is not None else {})}

    def _resident_fraction(self, pos):
        n_complete = pos // self.layout.ratio
        fr = []
        p = self.layout.page_entries
        for w, n in zip(self.state.resident, n_complete):
            if n:  # complete entries that sit in resident pages, over all complete entries
                ent = np.asarray(w)[:, None] * p + np.arange(p)
                fr.append(float(np.sum(ent < n)) / float(n))
        if fr:
            self.resident_fractions.append(float(np.mean(fr)))

    # -- the boundary before a window of n_steps starting at positions pos
    def boundary(self, cache, hidden, pos, n_steps, times, has_next: bool = True):
        """Make the window's resident set resident: with stale_by_one the set staged during the previous
        window (chosen from the previous boundary's scores), else chosen from this boundary's scores.
        With stale_by_one and `has_next`, this boundary's scores are kept for the next window."""
        t0 = time.perf_counter()
        staged, self.staged = self.staged, None
        if staged is not None:
            cache = self._apply(cache, *staged)
        times["recall_s"] += time.perf_counter() - t0
        need_now = staged is None
        scores = self._page_scores(hidden, pos, times) if need_now or has_next else None
        t0 = time.perf_counter()
        if need_now:
            cache = self._apply(cache, *self._plan(scores, pos, n_steps))
        self.tables_host = np.asarray(cache["tier"]["page_slot"])
        self._resident_fraction(pos)
        self.next_scores = scores if self.lsa.stale_by_one and has_next else None
        times["recall_s"] += time.perf_counter() - t0
        return cache

    def prepare_next(self, next_pos, times):
        """With stale_by_one: plan the next window from this boundary's scores and start its transfer
        (called right after the window is dispatched, so the host gather and H2D overlap it)."""
        if self.next_scores is None:
            return
        t0 = time.perf_counter()
        self.staged = self._plan(self.next_scores, next_pos, self.lsa.tau)
        self.next_scores = None
        times["recall_s"] += time.perf_counter() - t0

    # -- write-through of the entries completed during the window [pos, pos + n_steps)
    def after_window(self, cache, pos, n_steps, times):
        t0 = time.perf_counter()
        written = [kt.write_pages(int(q), self.layout, n_steps) for q in pos]
        m = self.layout.write_pages  # one shape for every window: no recompilation as windows cross pages
        pages = np.full((len(pos), m), -1, np.int64)
        for b, w in enumerate(written):
            pages[b, :len(w)] = w
        bidx = np.arange(len(pos))[:, None]
        slots = np.where(pages >= 0, self.tables_host[bidx, np.maximum(pages, 0)], -1)
        if np.any((pages >= 0) & (slots < 0)):  # select_pages always makes written pages resident
            raise AssertionError("a page written during the window is not resident")
        layers = {l: (cache["layers"][l]["comp_kv"], cache["layers"][l]["index_keys"]) for l in self.c.csa_layers}
        read = _read_slots(layers, self._put(np.maximum(slots, 0).astype(np.int32)), self.layout.page_entries)
        self.mirror.write_layers(read, pages)  # device arrays: each backend moves them its own way
        for l, (_, keys) in read.items():
            if l in self.full_keys:
                self.full_keys[l] = _update_full_keys(self.full_keys[l], keys, self._put(pages.astype(np.int32)),
                                                      self.mesh)
        times["write_through_s"] += time.perf_counter() - t0
        return cache
