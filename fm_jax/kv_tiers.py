"""Tiered CSA cache (SPEC §1, §3, §5): a host mirror of every CSA entry and a small device reserve.

Pages of `page_entries` CSA entries are the unit of residency and of transfer. The device reserve
holds `n_slots` pages per request for every CSA layer (attention KV and index keys); the shared tables
`page_slot [B, n_pages]` / `slot_page [B, n_slots]` (the `tier` of the decode cache) map between them
inside the jitted step. The host mirror holds every page of every CSA layer.

Host memory, two backends (`HostMirror.from_cache(..., backend=)`, the engine's `LSAConfig.host_mirror`):
- "numpy" (the default): the mirror is a set of NumPy arrays (mutable, so write-through is an in-place
  copy). Recall gathers the missing pages on the host and moves them with `jax.device_put` through a
  `pinned_host` staging copy when the backend has that memory kind (CPU and CUDA backends do, checked once in
  `host_memory_kind`), otherwise straight from NumPy; one thread per (layer, kv | keys) array and data shard,
  because a single thread's gather copy is far slower than PCIe (measured on the H100 host: 86-110 ms per
  290 MB cycle serial, 28-30 ms threaded). On a mesh each data shard's requests are gathered apart and copied
  only to the devices of that shard (`HostMirror.recall_to_device(plan, sharding)`).
- "pinned": JAX arrays in `pinned_host` memory (`kv_pinned.PinnedMirror`, same interface): recall is a
  jitted program reading the pinned arrays and writing device arrays (no host thread copies a byte),
  write-through a donated jitted in-place update. `benchmarks/bench_recall.py` times both to landing.

Bookkeeping (which page sits in which slot, LRU order) lives on the host in `ReserveState`; it is
updated only at cycle boundaries, never inside the jitted window.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from fm_jax.cache import entry_capacity
from fm_jax.sharding import batch_row_groups


@dataclass(frozen=True)
class TierLayout:
    """Page geometry of the CSA reserve. All counts are per request."""
    page_entries: int   # CSA entries per page
    n_pages: int        # pages of the full entry capacity
    n_slots: int        # pages the device reserve holds (= the resident budget K, capped at n_pages)
    ratio: int          # tokens per CSA entry
    sink_pages: int
    tail_pages: int
    write_pages: int    # most pages one window can write new entries into

    @property
    def n_cells(self) -> int:
        return self.n_slots * self.page_entries


def window_write_pages(config, tau: int) -> int:
    """The most CSA pages one window of `tau` decode steps can write to (the least `kmax_pages`)."""
    return -(-tau // (config.csa_ratio * config.page_entries)) + 1


def csa_pages(config, n_tokens: int) -> int:
    """Pages of one CSA layer's entries for `n_tokens` tokens (the last one partial)."""
    return entry_capacity(config, config.csa_layers[0], n_tokens) // config.page_entries


def make_layout(config, max_len: int, *, kmax_pages: int, recency_tail_pages: int, sink_pages: int,
                tau: int) -> TierLayout:
    """Reserve of `kmax_pages` pages (the release's K_max: recency tail, sink and the pages a window
    writes are chosen inside it), capped at the full page count (an unbounded budget gives exactly the
    full cache's shape). ValueError when the budget cannot hold the pages one window writes."""
    if not config.csa_layers:
        raise ValueError("LSA needs at least one CSA layer (compress_ratios has no csa_ratio entry)")
    p, r = config.page_entries, config.csa_ratio
    n_pages = csa_pages(config, max_len)
    write_pages = window_write_pages(config, tau)
    n_slots = min(n_pages, kmax_pages)
    if n_slots < min(n_pages, write_pages):
        raise ValueError(f"kmax_pages={kmax_pages} cannot hold the {write_pages} pages a window of tau={tau} steps "
                         f"may write ({p} entries of {r} tokens per page): raise kmax_pages or lower tau")
    return TierLayout(p, n_pages, n_slots, r, sink_pages, recency_tail_pages, write_pages)


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="fm_jax-recall")


@functools.cache
def host_memory_kind() -> str | None:
    """'pinned_host' when the default device offers it, else None (plain NumPy transfers)."""
    try:
        kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
    except Exception:  # noqa: BLE001 - backends without memory-kind support
        return None
    return "pinned_host" if "pinned_host" in kinds else None


def to_device(x: np.ndarray, sharding: jax.sharding.Sharding | None = None) -> jax.Array:
    """Host array -> `sharding` (default: the default device), staged through pinned host memory where
    available. A multi-device sharding sends every device only its own slice (sliced on the host)."""
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0]) if sharding is None else sharding
    kind = host_memory_kind()
    if kind is None:
        return jax.device_put(x, sharding)
    return jax.device_put(jax.device_put(x, sharding.with_memory_kind(kind)), sharding)


# ------------------------------------------------------------------------------------------ pages
def write_pages(position, layout: TierLayout, tau: int) -> np.ndarray:
    """Pages that entries completed by the tokens at [position, position + tau) are written to
    (entry e is completed by token (e + 1) * ratio - 1)."""
    p, r = layout.page_entries, layout.ratio
    first, last = position // r, min((position + tau) // r, layout.n_pages * p) - 1  # entries first..last
    if last < first:
        return np.zeros((0,), np.int64)
    return np.arange(first // p, last // p + 1, dtype=np.int64)


def select_pages(page_scores: np.ndarray, position: int, layout: TierLayout, tau: int, kmax_pages: int) -> np.ndarray:
    """The resident set of one request for the window of `tau` steps starting at `position` (the next
    token), as the release builds it: K = min(kmax_pages, candidate pages) pages, where the candidates
    are the pages holding complete entries plus the pages the window writes. The written pages, the
    sink and the recency tail get page score +inf (in that priority, the tail newest first, when they
    do not all fit); the rest of the budget goes to the highest `page_scores` [>= candidate pages]
    (ties: lower page first). Returns the sorted page ids int64 [K]."""
    p, r = layout.page_entries, layout.ratio
    n_complete = position // r
    written = write_pages(position, layout, tau)
    n_cand = max(-(-n_complete // p), int(written[-1]) + 1 if written.size else 0)
    k = min(kmax_pages, n_cand)
    last_complete = -(-n_complete // p) - 1
    tail = np.arange(last_complete, max(-1, last_complete - layout.tail_pages), -1)
    sink = np.arange(min(layout.sink_pages, last_complete + 1))
    forced = list(dict.fromkeys(int(x) for x in np.concatenate([written, sink, tail])))[:k]
    rest = np.setdiff1d(np.arange(n_cand), forced)
    rest = rest[np.lexsort((rest, -np.asarray(page_scores, np.float64)[rest]))][:k - len(forced)]
    return np.sort(np.concatenate([np.asarray(forced, np.int64), rest.astype(np.int64)]))


def page_counts(scores: np.ndarray, n_complete: int, threshold: float, page_entries: int, n_pages: int) -> np.ndarray:
    """Page scores of the Memory Indexer (SPEC §5 page-recall): the number of complete entries with
    score >= threshold per page. scores [n_entries] (the first n_complete are candidates) -> [n_pages]."""
    kept = np.nonzero(np.asarray(scores)[:n_complete] >= threshold)[0]
    return np.bincount(kept // page_entries, minlength=n_pages)[:n_pages].astype(np.float64)


def page_scores_recency(n_pages: int) -> np.ndarray:
    """The `recency` baseline: newer pages score higher."""
    return np.arange(n_pages, dtype=np.float64)


def page_scores_random(n_pages: int, rng: np.random.Generator) -> np.ndarray:
    """The `random` baseline: a uniform random order of the pages."""
    return rng.permutation(n_pages).astype(np.float64)


# ------------------------------------------------------------------------------------------ reserve
@dataclass
class ReserveState:
    """Host-side record of the reserve: page held by every slot (-1 = empty) and when it was last in
    the resident set (LRU); `resident[b]` is the resident page set of request b."""
    slot_page: np.ndarray          # [B, n_slots] int64
    last_used: np.ndarray          # [B, n_slots] int64
    resident: list                 # B arrays of pages
    clock: int = 0

    @classmethod
    def empty(cls, batch: int, layout: TierLayout) -> ReserveState:
        return cls(np.full((batch, layout.n_slots), -1, np.int64), np.full((batch, layout.n_slots), -1, np.int64),
                   [np.zeros((0,), np.int64) for _ in range(batch)])


@dataclass(frozen=True)
class RecallPlan:
    """Transfers for one cycle: `slots[b, j]` <- mirror page `pages[b, j]` (padding: slot = n_slots)."""
    slots: np.ndarray   # [B, M] int64
    pages: np.ndarray   # [B, M] int64
    n_pages: int        # real transfers (all requests)


def recall_bucket(m: int, n_slots: int) -> int:
    """Padded transfer count of a recall of up to `m` pages per request: the next power of two, capped
    at the reserve size (few distinct shapes, so few compilations; see `recall_buckets`)."""
    return min(1 << max(0, (m - 1).bit_length()), n_slots)


def recall_buckets(n_slots: int) -> list[int]:
    """Every value `recall_bucket` can return for a reserve of `n_slots` pages."""
    return sorted({recall_bucket(m, n_slots) for m in (1 << i for i in range(n_slots.bit_length() + 1))})


def plan_recall(state: ReserveState, wanted: list, layout: TierLayout, n_written: np.ndarray):
    """Make `wanted[b]` (<= n_slots pages each) resident. Pages already in a slot stay there; missing
    pages go to free slots: empty first, then least recently used; slots are taken in index order
    (so an unbounded reserve maps page p to slot p). Pages at or past `n_written[b]` hold no complete
    entry yet: they get a slot but nothing is transferred. Returns (new state, RecallPlan)."""
    b_count = state.slot_page.shape[0]
    slot_page, last_used = state.slot_page.copy(), state.last_used.copy()
    clock = state.clock + 1
    moves = []
    for b in range(b_count):
        want = np.asarray(wanted[b], np.int64)
        if want.size > layout.n_slots:
            raise ValueError(f"request {b}: {want.size} pages wanted but the reserve holds {layout.n_slots}")
        held = {int(p): s for s, p in enumerate(slot_page[b]) if p >= 0}
        keep = np.isin(slot_page[b], want)
        missing = [int(p) for p in want if int(p) not in held]
        free = [s for s in np.lexsort((np.arange(layout.n_slots), last_used[b])) if not keep[s]]
        # empty slots have last_used -1 and sort first; ties in index order
        mv = []
        for page, slot in zip(missing, free):
            slot_page[b, slot] = page
            if page < n_written[b]:
                mv.append((slot, page))
        last_used[b, np.isin(slot_page[b], want)] = clock
        moves.append(mv)
    m = max([len(mv) for mv in moves] + [0])
    m_pad = recall_bucket(m, layout.n_slots) if m else 0
    slots = np.full((b_count, m_pad), layout.n_slots, np.int64)
    pages = np.zeros((b_count, m_pad), np.int64)
    for b, mv in enumerate(moves):
        for j, (s, p) in enumerate(mv):
            slots[b, j], pages[b, j] = s, p
    new_state = dataclasses.replace(state, slot_page=slot_page, last_used=last_used,
                                    resident=[np.asarray(w, np.int64) for w in wanted], clock=clock)
    return new_state, RecallPlan(slots, pages, sum(len(mv) for mv in moves))


def device_tables(state: ReserveState, layout: TierLayout):
    """The decode cache's `tier`: page_slot [B, n_pages], slot_page [B, n_slots] (int32), restricted to
    the resident set (pages held in the reserve but not resident are invisible)."""
    b_count = state.slot_page.shape[0]
    page_slot = np.full((b_count, layout.n_pages), -1, np.int32)
    slot_page = np.full((b_count, layout.n_slots), -1, np.int32)
    for b in range(b_count):
        res = np.isin(state.slot_page[b], state.resident[b]) & (state.slot_page[b] >= 0)
        slots = np.nonzero(res)[0]
        page_slot[b, state.slot_page[b, slots]] = slots
        slot_page[b, slots] = state.slot_page[b, slots]
    return {"page_slot": jnp.asarray(page_slot), "slot_page": jnp.asarray(slot_page)}


# ------------------------------------------------------------------------------------------ mirror
MIRROR_BACKENDS = ("numpy", "pinned")


class PageChecksumError(RuntimeError):
    """A page read from the host mirror does not match the checksum stored when it was written."""


def page_checksums(pages: np.ndarray) -> np.ndarray:
    """Checksum of every page: the sum of its 32-bit words modulo 2**64 (any single flipped bit, and a
    short copy that leaves a non-zero part of the page out, change it). [B, M, ...] -> uint64 [B, M]."""
    page_nbytes = int(np.prod(pages.shape[2:])) * pages.dtype.itemsize
    flat = np.ascontiguousarray(pages).view(np.uint8).reshape(pages.shape[0], pages.shape[1], page_nbytes)
    words = flat.view(np.uint32) if flat.shape[-1] % 4 == 0 else flat
    return np.add.reduce(words, axis=-1, dtype=np.uint64)


def check_pages(host: np.ndarray, sums: np.ndarray, key, bidx: np.ndarray, pages: np.ndarray) -> None:
    """Raise PageChecksumError unless the recalled pages host [b, M, ...] (requests bidx [b, 1] of the
    batch, pages [b, M]) match their stored checksums `sums` [B, n_pages]; key = (layer, "kv" | "keys")."""
    bad = np.argwhere(page_checksums(host) != sums[bidx, pages])
    if bad.size:
        b, j = (int(x) for x in bad[0])
        raise PageChecksumError(f"CSA layer {key[0]} {key[1]}: page {int(pages[b, j])} of request "
                                f"{int(bidx[b, 0])} does not match its checksum on recall ({len(bad)} bad "
                                "page(s)): the host mirror or the host copy is corrupted")


def update_checksums(sums: np.ndarray, new: np.ndarray, pages: np.ndarray) -> None:
    """sums [B, n_pages] of the pages [B, M] (-1 = padding) rewritten with new [B, M, ...]."""
    for b in range(pages.shape[0]):
        ok = pages[b] >= 0
        sums[b, pages[b, ok]] = page_checksums(new[b:b + 1, ok])[0]


def whole_array(shape: tuple, sharding: jax.sharding.Sharding, arrs: list) -> jax.Array:
    """One array of `shape` with `sharding` from its per-device pieces (every data shard's, in device order
    within a shard)."""
    return arrs[0] if len(arrs) == 1 else jax.make_array_from_single_device_arrays(shape, sharding, arrs)


def _gather(src: np.ndarray, bidx: np.ndarray, pages: np.ndarray) -> np.ndarray:
    """Host copy of the recalled pages [B, M, ...] (one function so tests can fault it)."""
    return src[bidx, pages]


@dataclass
class HostMirror:
    """Every CSA entry in host memory, per CSA layer: kv [B, n_pages, page_entries, kv_row] (the cache's rows:
    head_dim values, or packed fp8 uint8 rows of kv_entry_bytes with `kv_fp8`) and index keys
    uint8 [B, n_pages, page_entries * (index_head_dim + 4)] (the cache's page-blocked layout,
    `fm_jax.layers.key_pages`: a page is one contiguous blob). With `verify`, every page carries
    a checksum (`page_checksums`, updated on write) that recall checks before the transfer."""
    kv: dict       # layer -> np.ndarray
    keys: dict     # layer -> np.ndarray
    verify: bool = False
    sums: dict = dataclasses.field(default_factory=dict)  # (layer, "kv" | "keys") -> uint64 [B, n_pages]
    pinned_staging: bool = True  # recall through a pinned_host copy (`to_device`); False: NumPy -> device

    @classmethod
    def from_cache(cls, cache, config, layout: TierLayout, *, verify: bool = False, backend: str = "numpy",
                   sharding: jax.sharding.Sharding | None = None):
        """Copy the full (entry-indexed) CSA buffers of a prefilled cache to the host. backend "numpy": this
        class; "pinned": a `kv_pinned.PinnedMirror` (same interface) of pinned_host JAX arrays, each data shard
        of the per-request `sharding` in the pinned memory of its first device (`sharding` is unused by
        "numpy", whose recall splits per shard at transfer time)."""
        if backend == "pinned":
            from fm_jax.kv_pinned import PinnedMirror  # it imports this module
            return PinnedMirror.from_cache(cache, config, layout, verify=verify, sharding=sharding)
        if backend != "numpy":
            raise ValueError(f"backend must be one of {MIRROR_BACKENDS}, got {backend!r}")
        kv, keys = {}, {}
        for l in config.csa_layers:
            lc = cache["layers"][l]
            b = lc["comp_kv"].shape[0]
            kv[l] = np.array(lc["comp_kv"]).reshape(b, layout.n_pages, layout.page_entries, -1)
            keys[l] = np.array(lc["index_keys"])   # already [B, n_pages, page bytes]
        mirror = cls(kv, keys)
        if verify:
            mirror.start_verifying()
        return mirror

    def to_backend(self, backend: str, sharding: jax.sharding.Sharding | None = None):
        """This mirror with `backend`'s arrays (see `from_cache`): itself for "numpy"."""
        if backend == "pinned":
            from fm_jax.kv_pinned import PinnedMirror
            return PinnedMirror.from_arrays(self.kv, self.keys, sharding, self.verify)
        if backend != "numpy":
            raise ValueError(f"backend must be one of {MIRROR_BACKENDS}, got {backend!r}")
        return self

    def start_verifying(self) -> None:
        """Checksum every page now; recall checks them from here on (and writes keep them current)."""
        self.verify = True
        self.sums = {(l, name): page_checksums(src) for l, name, src in self._arrays()}

    @property
    def layers(self) -> tuple:
        return tuple(self.kv)

    def _arrays(self):
        return [(l, name, src) for l in self.kv for name, src in (("kv", self.kv[l]), ("keys", self.keys[l]))]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.kv.values()) + sum(a.nbytes for a in self.keys.values())

    def _recall_one(self, layer, name, src, rows, pages, devices) -> list:
        """Gather + check + transfer the pages of one (layer, kv | keys) array for the requests `rows`
        (one data shard; pages [len(rows), M]) onto each of `devices` (the devices that own them)."""
        bidx = np.arange(src.shape[0])[rows][:, None]
        host = _gather(src, bidx, pages)
        if self.verify:
            check_pages(host, self.sums[(layer, name)], (layer, name), bidx, pages)
        put = to_device if self.pinned_staging else jax.device_put
        return [put(host, jax.sharding.SingleDeviceSharding(d)) for d in devices]

    def compile_recall(self, plan: RecallPlan, sharding: jax.sharding.Sharding | None = None) -> None:
        """Compile what a recall of `plan`'s shape runs: nothing here (NumPy gather + device_put)."""

    def recall_to_device(self, plan: RecallPlan, sharding: jax.sharding.Sharding | None = None):
        """`gather` (+ checksum check with `verify`) + `to_device` for every (layer, kv | keys) array and
        every data shard of `sharding` (a per-request sharding, e.g. `sharding.batch_sharding`; default
        the default device), in parallel threads: NumPy's fancy-index copy and the device_put both release
        the GIL, and one thread's memcpy rate is far below the PCIe rate. Each shard's requests are
        gathered apart and land only on the devices that own them (no host array of the whole batch, no
        hop through one device). Returns {layer: (kv [B, M, P, kv_row], keys [B, M, page bytes])} with `sharding`
        (transfers may still be running). Raises PageChecksumError on a corrupted page."""
        b, m = plan.pages.shape
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0]) if sharding is None else sharding
        groups = batch_row_groups(sharding, b)
        jobs = [(l, name, src, rows, devs) for l, name, src in self._arrays() for rows, devs in groups]
        parts = list(_pool().map(lambda j: self._recall_one(*j[:4], plan.pages[j[3]], j[4]), jobs))
        shards = {}  # (layer, name) -> (full shape, per-device arrays of every shard)
        for (l, name, src, _, _), arrs in zip(jobs, parts):
            shards.setdefault((l, name), ((b, m) + src.shape[2:], []))[1].extend(arrs)
        whole = {k: whole_array(shape, sharding, arrs) for k, (shape, arrs) in shards.items()}
        return {l: (whole[(l, "kv")], whole[(l, "keys")]) for l in self.kv}

    def write_through(self, layer: int, slots_kv, slots_keys, pages: np.ndarray):
        """Store reserve pages read back from the device. slots_kv [B, M, P, kv_row], slots_keys [B, M, page
        bytes] (device arrays are copied to the host); pages: [B, M] (page < 0 = padding, skipped)."""
        slots_kv, slots_keys = np.asarray(slots_kv), np.asarray(slots_keys)
        for b in range(pages.shape[0]):
            ok = pages[b] >= 0
            self.kv[layer][b, pages[b, ok]] = slots_kv[b, ok]
            self.keys[layer][b, pages[b, ok]] = slots_keys[b, ok]
        if self.verify:
            for name, arr in (("kv", slots_kv), ("keys", slots_keys)):
                update_checksums(self.sums[(layer, name)], arr, pages)

    def write_layers(self, new: dict, pages: np.ndarray):
        """`write_through` of every layer of new {layer: (slots_kv, slots_keys)}."""
        for l, (kv, keys) in new.items():
            self.write_through(l, kv, keys, pages)


def page_bytes(config) -> int:
    """Device bytes of one reserve page of one CSA layer (attention KV rows + index keys)."""
    return config.page_entries * (config.kv_entry_bytes + config.index_key_bytes)
