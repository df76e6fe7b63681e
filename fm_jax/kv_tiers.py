"""Tiered CSA cache (SPEC §1, §3, §5): a host mirror of every CSA entry and a small device reserve.

Pages of `page_entries` CSA entries are the unit of residency and of transfer. The device reserve
holds `n_slots` pages per request for every CSA layer (attention KV and index keys); the shared tables
`page_slot [B, n_pages]` / `slot_page [B, n_slots]` (the `tier` of the decode cache) map between them
inside the jitted step. The host mirror holds every page of every CSA layer.

Host memory: the mirror is a set of NumPy arrays (mutable, so write-through is an in-place copy).
Recall gathers the missing pages on the host and moves them with `jax.device_put` through a
`pinned_host` staging copy when the backend has that memory kind (CPU and CUDA backends do, checked
once in `host_memory_kind`), otherwise straight from NumPy; one thread per (layer, kv | keys) array,
because a single thread's gather copy is far slower than PCIe (measured on the H100 host: 86-110 ms
per 290 MB cycle serial, 28-30 ms threaded).

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


@dataclass(frozen=True)
class TierLayout:
    """Page geometry of the CSA reserve. All counts are per request."""
    page_entries: int   # CSA entries per page
    n_pages: int        # pages of the full entry capacity
    n_slots: int        # pages the device reserve holds
    ratio: int          # tokens per CSA entry
    sink_pages: int
    tail_pages: int
    write_pages: int    # pages the next window can write new entries into

    @property
    def n_cells(self) -> int:
        return self.n_slots * self.page_entries


def make_layout(config, max_len: int, *, kmax_pages: int, recency_tail_pages: int, sink_pages: int,
                tau: int) -> TierLayout:
    """Reserve of `kmax_pages` chosen pages + tail + sink + the pages a window of `tau` steps writes,
    capped at the full page count (an unbounded budget gives exactly the full cache's shape)."""
    if not config.csa_layers:
        raise ValueError("LSA needs at least one CSA layer (compress_ratios has no csa_ratio entry)")
    p, r = config.page_entries, config.csa_ratio
    n_pages = entry_capacity(config, config.csa_layers[0], max_len) // p
    write_pages = -(-tau // (r * p)) + 1
    n_slots = min(n_pages, kmax_pages + recency_tail_pages + sink_pages + write_pages)
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


def to_device(x: np.ndarray) -> jax.Array:
    """Host array -> default device, staged through pinned host memory where available."""
    kind = host_memory_kind()
    dev = jax.devices()[0]
    if kind is None:
        return jax.device_put(x, dev)
    staged = jax.device_put(x, jax.sharding.SingleDeviceSharding(dev, memory_kind=kind))
    return jax.device_put(staged, jax.sharding.SingleDeviceSharding(dev))


# ------------------------------------------------------------------------------------------ pages
def required_pages(position: int, layout: TierLayout, tau: int) -> np.ndarray:
    """Pages a request at `position` (next token) needs for a window of `tau` steps, whatever the
    indexer says: the attention sink, the recency tail up to the newest complete entry, and the pages
    that entries completing during the window are written to."""
    p, r = layout.page_entries, layout.ratio
    n_complete = position // r
    last_complete_page = (n_complete - 1) // p if n_complete else -1
    first_write = position // r // p
    last_write = min((position + tau) // r // p, layout.n_pages - 1)
    tail = np.arange(max(0, last_complete_page - layout.tail_pages + 1), last_complete_page + 1)
    sink = np.arange(min(layout.sink_pages, max(last_complete_page + 1, 0)))
    write = np.arange(first_write, last_write + 1)
    return np.unique(np.concatenate([sink, tail, write]).astype(np.int64))


def pages_by_score(scores: np.ndarray, n_complete: int, threshold: float, page_entries: int,
                   kmax_pages: int) -> np.ndarray:
    """The `kmax_pages` pages holding the most entries with score >= threshold (SPEC §5 page-recall).
    scores: [n_entries] (only the first n_complete are candidates). Ties -> lower page first."""
    kept = np.nonzero(scores[:n_complete] >= threshold)[0]
    if kept.size == 0 or kmax_pages <= 0:
        return np.zeros((0,), np.int64)
    counts = np.bincount(kept // page_entries)
    pages = np.nonzero(counts)[0]
    order = np.lexsort((pages, -counts[pages]))
    return np.sort(pages[order[:kmax_pages]])


def pages_recency(n_complete: int, page_entries: int, kmax_pages: int) -> np.ndarray:
    n = -(-n_complete // page_entries)
    return np.arange(max(0, n - kmax_pages), n)


def pages_random(n_complete: int, page_entries: int, kmax_pages: int, rng: np.random.Generator) -> np.ndarray:
    n = -(-n_complete // page_entries)
    return np.sort(rng.choice(n, size=min(n, kmax_pages), replace=False)) if n else np.zeros((0,), np.int64)


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
    m_pad = 1 << max(0, (m - 1).bit_length()) if m else 0  # few distinct shapes -> few compilations
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
@dataclass
class HostMirror:
    """Every CSA entry in host memory, per CSA layer: kv [B, n_pages, page_entries, head_dim] and
    index keys [B, n_pages, page_entries, index_head_dim + 4] (uint8)."""
    kv: dict       # layer -> np.ndarray
    keys: dict     # layer -> np.ndarray

    @classmethod
    def from_cache(cls, cache, config, layout: TierLayout) -> HostMirror:
        """Copy the full (entry-indexed) CSA buffers of a prefilled cache to the host."""
        kv, keys = {}, {}
        for l in config.csa_layers:
            lc = cache["layers"][l]
            b = lc["comp_kv"].shape[0]
            kv[l] = np.array(lc["comp_kv"]).reshape(b, layout.n_pages, layout.page_entries, -1)
            keys[l] = np.array(lc["index_keys"]).reshape(b, layout.n_pages, layout.page_entries, -1)
        return cls(kv, keys)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.kv.values()) + sum(a.nbytes for a in self.keys.values())

    def recall_to_device(self, plan: RecallPlan):
        """`gather` + `to_device` for every (layer, kv | keys) array, in parallel threads: NumPy's
        fancy-index copy and the device_put both release the GIL, and one thread's memcpy rate is far
        below the PCIe rate. Returns {layer: (kv, keys)} device arrays (transfers may still be running)."""
        bidx = np.arange(plan.pages.shape[0])[:, None]
        jobs = [(l, i, src) for l in self.kv for i, src in enumerate((self.kv[l], self.keys[l]))]
        out = {l: [None, None] for l in self.kv}
        for (l, i, _), arr in zip(jobs, _pool().map(lambda j: to_device(j[2][bidx, plan.pages]), jobs)):
            out[l][i] = arr
        return {l: tuple(v) for l, v in out.items()}

    def write_through(self, layer: int, slots_kv: np.ndarray, slots_keys: np.ndarray, pages: np.ndarray):
        """Store reserve pages read back from the device. slots_*: [B, M, P, ...]; pages: [B, M]
        (page < 0 = padding, skipped)."""
        for b in range(pages.shape[0]):
            ok = pages[b] >= 0
            self.kv[layer][b, pages[b, ok]] = slots_kv[b, ok]
            self.keys[layer][b, pages[b, ok]] = slots_keys[b, ok]


def page_bytes(config) -> int:
    """Device bytes of one reserve page of one CSA layer (attention KV + index keys)."""
    return config.page_entries * (config.head_dim * config.compute_dtype.itemsize + config.index_key_bytes)
