"""Memory Indexer training data: the on-disk shard format, the dataset, fixed-shape batches, hard
negatives and host-side prefetch.

On disk (one directory per dump; never pickle)::

    manifest.json                 format/version, the dump settings, target / voting layers, ratio r,
                                  tau, min_layers, dims, and one entry per document
                                  {"id", "file", "bytes", "sha256", "n_tokens", "n_entries", "n_queries", ...}
    doc_<id>.safetensors          one document:
        hidden_layer_{L}   bf16  [T, d_model]   residual input of target layer L at every position
                                               ("hidden_rows": "queries" -> [Q, d_model], one row per query)
        compk_layer_{L}    uint8 [n_pages, P * (D + 4)]  the layer's fp8 index keys, page-blocked as the decode
                                               cache stores them (`fm_jax.layers.key_pages`; manifest
                                               "key_layout": "pages", "key_page_entries": P; the last page
                                               zero padded, "n_entries" of the document's entry counts)
                           uint8 [N, D + 4]     dumps made before issue 12 (no "key_layout", or "rows"):
                                               packed rows (SPEC §3); read as they are
        query_positions    int32 [Q]            query token positions s (hidden row and RoPE position)
        label_indices      int32 [nnz]          CSR golden labels (train.labels)
        label_scores       float32 [nnz]        layer counts (manifest "label_score_max" = their maximum)
        label_pointers     int64 [Q + 1]
    li_init.safetensors           the backbone Lightning Indexer's query tower as a FlashMemory joint
                                  checkpoint (initialisation for train.fit; carries the IndexerConfig)

Readers see keys as packed rows ``[N, D + 4]`` whatever the layout on disk (``Doc.keys``: training gathers
single entries, which rows serve best).

A query's candidates are the entries visible to its token (``train.labels.n_candidates``); with
``"candidates": "stored"`` (imported release dumps, whose keys cover the prompt only) they are all the
stored entries, as in the release's dataloader.

A *sample* is one (document, query) pair. Its entries are all positives plus negatives drawn uniformly from
the other candidates (``ceil(neg_ratio * n_pos)``, at least ``min_neg``) plus up to ``n_hard`` hard negatives
mined with a previous checkpoint; they are padded to the smallest bucket size that holds them, and batches
group samples of one bucket, so every batch has one of a few fixed shapes::

    hidden    [B, L, d_model]  (stored dtype, bf16)     keys    uint8 [B, L, M, D + 4]
    positions int32 [B]                                 labels  float32 [B, M] (1/0, or vote scores)
    lengths   int32 [B]  (valid entries come first)     mask    bool [B, M]
    weight    float32 [B] (0 for padding samples)       entry_ids int32 [B, M]

The batch of global step ``s`` is a pure function of ``(seed, s)``: epoch ``e`` shuffles the samples with
``default_rng([seed, e])`` and each sample's negatives come from ``default_rng([seed, e, sample])``.
Resuming at step ``s`` therefore reproduces the exact data order without storing iterator state.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import queue
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from fm_jax.layers.key_pages import block_index_keys, unblock_index_keys
from train.labels import CSR, n_candidates, validate_csr

FORMAT = "fm_jax.indexer_data"
VERSION = 2  # 2: query_positions are query tokens (entries visible to them), scores are layer counts
MANIFEST = "manifest.json"
LI_INIT = "li_init.safetensors"
HARD_FORMAT = "fm_jax.hard_negatives"
DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


class ShardError(ValueError):
    """A shard or manifest that cannot be read or fails validation; the message names the file."""


# ---------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------
def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def pin_settings(path: str, settings: dict, keys, conflict: str) -> None:
    """First call writes `settings` to `path`; later calls must match it on `keys`, else SystemExit
    with `conflict` (a message prefix) and the differing keys. Guards reruns into an output folder."""
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as they come back from the file
    if not os.path.exists(path):
        atomic_write_json(path, settings)
        return
    with open(path) as f:
        old = json.load(f)
    diff = [k for k in keys if old.get(k) != settings.get(k)]
    if diff:
        raise SystemExit(f"{conflict} ({', '.join(diff)}); use a new --out directory")


def save_shard(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> dict:
    """Write a safetensors shard atomically (temp file + rename). Returns {"bytes", "sha256"}."""
    from safetensors.numpy import save

    data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                metadata={k: str(v) for k, v in (metadata or {}).items()})
    atomic_write_bytes(path, data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def load_shard(path: str, *, nbytes: int | None = None, sha256: str | None = None,
               keys: Sequence[str] | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors shard; any truncation / corruption / mismatch raises ``ShardError`` naming it."""
    from safetensors import SafetensorError, safe_open

    if not os.path.exists(path):
        raise ShardError(f"{path}: shard file is missing")
    size = os.path.getsize(path)
    if nbytes is not None and size != nbytes:
        raise ShardError(f"{path}: shard has {size} bytes, the manifest records {nbytes} (truncated or "
                         "rewritten file)")
    if sha256 is not None:
        got = sha256_file(path)
        if got != sha256:
            raise ShardError(f"{path}: sha256 {got[:16]}... does not match the manifest's {sha256[:16]}... "
                             "(corrupted shard)")
    try:
        out = {}
        with safe_open(path, framework="numpy") as f:
            meta = dict(f.metadata() or {})
            names = list(f.keys()) if keys is None else list(keys)
            for k in names:
                out[k] = f.get_tensor(k)
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise ShardError(f"{path}: cannot read shard: {type(e).__name__}: {e}") from None
    return out, meta


def read_manifest(data_dir: str) -> dict:
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.exists(path):
        raise ShardError(f"{path}: no manifest (is {data_dir!r} a train.dump output directory?)")
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: unreadable manifest: {e}") from None
    if m.get("format") != FORMAT:
        raise ShardError(f"{path}: format {m.get('format')!r} is not {FORMAT!r}")
    if m.get("version") != VERSION:
        raise ShardError(f"{path}: version {m.get('version')!r} is not supported (expected {VERSION})")
    for k in ("target_layers", "ratio", "d_model", "index_key_bytes", "docs", "hidden_rows"):
        if k not in m:
            raise ShardError(f"{path}: manifest lacks {k!r}")
    return m


KEY_LAYOUTS = ("rows", "pages")   # manifest "key_layout": how compk_layer_* are stored (absent = "rows")


def key_layout_fields(page_entries: int) -> dict:
    """The manifest fields of a dump whose keys are stored with `stored_keys(..., page_entries)`."""
    return {"key_layout": "pages", "key_page_entries": int(page_entries)}


def stored_keys(rows: np.ndarray, page_entries: int) -> np.ndarray:
    """What writers store as compk_layer_*: packed rows uint8 [N, D + 4] -> pages [ceil(N / P), P * (D + 4)]."""
    return np.ascontiguousarray(block_index_keys(np.asarray(rows, np.uint8), page_entries))


def keys_as_rows(k: np.ndarray, manifest: dict, n_entries: int | None, kb: int, where: str) -> np.ndarray:
    """A stored compk_layer_* as packed rows uint8 [N, kb] (page-blocked dumps are converted; row dumps made
    before the page layout pass through). `n_entries`: the document's entry count (pages are padded)."""
    layout = manifest.get("key_layout", "rows")
    if layout not in KEY_LAYOUTS:
        raise ShardError(f"{where}: manifest key_layout {layout!r} is not one of {KEY_LAYOUTS}")
    if layout == "rows":
        if k.dtype != np.uint8 or k.ndim != 2 or k.shape[1] != kb:
            raise ShardError(f"{where}: compk must be uint8 [N, {kb}] (manifest key_layout 'rows'), "
                             f"got {k.dtype}{k.shape}")
        return k
    p = manifest.get("key_page_entries")
    if not isinstance(p, int) or p <= 0:
        raise ShardError(f"{where}: manifest key_layout 'pages' needs a positive int key_page_entries, got {p!r}")
    if k.dtype != np.uint8 or k.ndim != 2 or k.shape[1] != p * kb:
        raise ShardError(f"{where}: compk must be uint8 [n_pages, key_page_entries * index_key_bytes = {p * kb}] "
                         f"(manifest key_layout 'pages'), got {k.dtype}{k.shape}")
    if n_entries is None or not 0 <= int(n_entries) <= k.shape[0] * p or int(n_entries) <= (k.shape[0] - 1) * p:
        raise ShardError(f"{where}: document entry count {n_entries!r} does not fit {k.shape[0]} stored pages "
                         f"of {p} entries")
    return unblock_index_keys(k, p, kb - 4)[:int(n_entries)]


def candidates_of(manifest: dict, positions, n_entries: int) -> np.ndarray:
    """Candidate entries of each query int64 [Q] (see the module docstring)."""
    if manifest.get("candidates") == "stored":
        return np.full(len(positions), n_entries, np.int64)
    return n_candidates(positions, int(manifest["ratio"]))


# ---------------------------------------------------------------------------------------------------
# one document
# ---------------------------------------------------------------------------------------------------
@dataclass
class Doc:
    doc_id: str
    hidden: dict[int, np.ndarray]   # layer -> [rows, d]
    keys: dict[int, np.ndarray]     # layer -> uint8 [N, D + 4]
    positions: np.ndarray           # int32 [Q]
    hidden_rows: np.ndarray         # int64 [Q]: row of hidden[*] for query q
    labels: CSR
    n_candidates: np.ndarray        # int64 [Q]: entries complete before each query
    n_entries: int


def doc_tensor_names(target_layers: Iterable[int]) -> list[str]:
    names = ["query_positions", "label_indices", "label_scores", "label_pointers"]
    for lyr in target_layers:
        names += [f"hidden_layer_{lyr}", f"compk_layer_{lyr}"]
    return names


def _doc_entries(manifest: dict, doc_id: str):
    """The manifest's "n_entries" of document `doc_id` (None when absent)."""
    return next((d.get("n_entries") for d in manifest.get("docs", ()) if d.get("id") == doc_id), None)


def doc_from_tensors(tensors: dict[str, np.ndarray], manifest: dict, doc_id: str, where: str,
                     n_entries: int | None = None) -> Doc:
    """Validate one document's tensors against the manifest; errors name ``where``. `n_entries`: the
    document's entry count (default: its manifest entry's), needed for page-blocked keys."""
    layers = [int(x) for x in manifest["target_layers"]]
    for name in doc_tensor_names(layers):
        if name not in tensors:
            raise ShardError(f"{where}: missing tensor {name!r}")
    pos = np.asarray(tensors["query_positions"])
    if pos.ndim != 1 or not np.issubdtype(pos.dtype, np.integer):
        raise ShardError(f"{where}: query_positions must be int [Q], got {pos.dtype}{pos.shape}")
    q = len(pos)
    d = int(manifest["d_model"])
    kb = int(manifest["index_key_bytes"])
    doc_entries = n_entries
    if doc_entries is None and manifest.get("key_layout", "rows") != "rows":
        doc_entries = _doc_entries(manifest, doc_id)
    n_entries = None
    hidden, keys = {}, {}
    for lyr in layers:
        h = tensors[f"hidden_layer_{lyr}"]
        k = keys_as_rows(tensors[f"compk_layer_{lyr}"], manifest, doc_entries, kb, f"{where}: compk_layer_{lyr}")
        if h.ndim != 2 or h.shape[1] != d:
            raise ShardError(f"{where}: hidden_layer_{lyr} must be [rows, d_model={d}], got {h.shape}")
        if h.dtype.kind not in "f" and h.dtype.name not in ("bfloat16",):
            raise ShardError(f"{where}: hidden_layer_{lyr} must be floating, got {h.dtype}")
        if k.dtype != np.uint8 or k.ndim != 2 or k.shape[1] != kb:
            raise ShardError(f"{where}: compk_layer_{lyr} must be uint8 [N, {kb}], got {k.dtype}{k.shape}")
        if n_entries is None:
            n_entries = k.shape[0]
        elif k.shape[0] != n_entries:
            raise ShardError(f"{where}: compk_layer_{lyr} has {k.shape[0]} entries, other layers {n_entries}")
        hidden[lyr], keys[lyr] = h, k
    rows_mode = manifest["hidden_rows"]
    if rows_mode == "positions":
        rows = pos.astype(np.int64)
    elif rows_mode == "queries":
        rows = np.arange(q, dtype=np.int64)
    else:
        raise ShardError(f"{where}: manifest hidden_rows {rows_mode!r} is neither 'positions' nor 'queries'")
    n_rows = hidden[layers[0]].shape[0]
    if any(h.shape[0] != n_rows for h in hidden.values()):
        raise ShardError(f"{where}: hidden_layer_* disagree in their number of rows")
    if q and (pos.min() < 0 or rows.max() >= n_rows):
        raise ShardError(f"{where}: query rows exceed the {n_rows} stored hidden rows")
    n_cand = candidates_of(manifest, pos, int(n_entries))
    if q and n_cand.max() > n_entries:
        raise ShardError(f"{where}: a query at position {int(pos.max())} would see {int(n_cand.max())} entries "
                         f"but only {n_entries} are stored")
    csr = CSR(np.asarray(tensors["label_indices"]), np.asarray(tensors["label_scores"], np.float32),
              np.asarray(tensors["label_pointers"]).astype(np.int64))
    try:
        validate_csr(csr, n_cand, where)
    except ValueError as e:
        raise ShardError(str(e)) from None
    return Doc(doc_id, hidden, keys, pos.astype(np.int32), rows, csr, n_cand, int(n_entries))


# ---------------------------------------------------------------------------------------------------
# dataset
# ---------------------------------------------------------------------------------------------------
class IndexerDataset:
    """The documents of one dump directory (optionally a subset), loaded lazily with an LRU cache.

    ``samples``: int64 [S, 2] = (document index, query index) for every query with >= 1 candidate.
    ``pos_counts`` / ``cand_counts``: int64 [S] positives / candidates of each sample.
    """

    def __init__(self, data_dir: str, doc_ids: Sequence[str] | None = None, *, cache_docs: int = 64,
                 verify: bool = True, hard_negatives: str | None = None):
        self.data_dir = data_dir
        self.manifest = read_manifest(data_dir)
        self.target_layers = tuple(int(x) for x in self.manifest["target_layers"])
        self.ratio = int(self.manifest["ratio"])
        entries = {d["id"]: d for d in self.manifest["docs"]}
        if doc_ids is None:
            doc_ids = [d["id"] for d in self.manifest["docs"]]
        missing = [i for i in doc_ids if i not in entries]
        if missing:
            raise ShardError(f"{os.path.join(data_dir, MANIFEST)}: no documents {missing[:5]}")
        self.doc_ids = list(doc_ids)
        self._entries = [entries[i] for i in self.doc_ids]
        self.verify = verify
        self._cache: OrderedDict[int, Doc] = OrderedDict()
        self._cache_docs = max(1, cache_docs)
        self._verified: set[str] = set()
        self._lock = threading.Lock()
        # per-query label counts from the shards' small CSR pointer tensors (no hidden states read)
        samples, pos_counts, cand_counts = [], [], []
        for di in range(len(self._entries)):
            path = self.path(di)
            t, _ = self._load(di, keys=["label_pointers", "query_positions"])
            ptr = np.asarray(t["label_pointers"], np.int64)
            qp = np.asarray(t["query_positions"], np.int64)
            if ptr.ndim != 1 or len(ptr) != len(qp) + 1:
                raise ShardError(f"{path}: label_pointers has shape {ptr.shape}, expected [{len(qp) + 1}]")
            nc = candidates_of(self.manifest, qp, int(self._entries[di].get("n_entries", 0)))
            ok = np.flatnonzero(nc > 0)
            samples.append(np.stack([np.full(len(ok), di), ok], 1))
            pos_counts.append(np.diff(ptr)[ok])
            cand_counts.append(nc[ok])
        self.samples = np.concatenate(samples).astype(np.int64) if samples else np.zeros((0, 2), np.int64)
        self.pos_counts = np.concatenate(pos_counts).astype(np.int64) if pos_counts else np.zeros(0, np.int64)
        self.cand_counts = np.concatenate(cand_counts).astype(np.int64) if cand_counts else np.zeros(0, np.int64)
        self.hard = load_hard_negatives(hard_negatives, self.doc_ids) if hard_negatives else None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def n_docs(self) -> int:
        return len(self.doc_ids)

    def path(self, di: int) -> str:
        return os.path.join(self.data_dir, self._entries[di]["file"])

    def _load(self, di: int, keys=None):
        e = self._entries[di]
        path = self.path(di)
        check = self.verify and path not in self._verified
        t, meta = load_shard(path, nbytes=e.get("bytes"), sha256=e.get("sha256") if check else None, keys=keys)
        if check:
            self._verified.add(path)
        return t, meta

    def doc(self, di: int) -> Doc:
        with self._lock:
            if di in self._cache:
                self._cache.move_to_end(di)
                return self._cache[di]
        t, _ = self._load(di, keys=doc_tensor_names(self.target_layers))
        d = doc_from_tensors(t, self.manifest, self.doc_ids[di], self.path(di), self._entries[di].get("n_entries"))
        with self._lock:
            self._cache[di] = d
            while len(self._cache) > self._cache_docs:
                self._cache.popitem(last=False)
        return d

    def hard_row(self, di: int, q: int) -> np.ndarray:
        if self.hard is None:
            return np.zeros(0, np.int32)
        return self.hard[di].row(q)[0]


def split_docs(doc_ids: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train / validation split by document."""
    ids = sorted(doc_ids)
    if val_fraction <= 0 or len(ids) < 2:
        return ids, []
    n_val = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
    perm = np.random.default_rng([seed, 7919]).permutation(len(ids))
    val = sorted(ids[i] for i in perm[:n_val])
    return [i for i in ids if i not in set(val)], val


# ---------------------------------------------------------------------------------------------------
# hard negatives (mined with a previous checkpoint)
# ---------------------------------------------------------------------------------------------------
def mine_hard_negatives(dataset: IndexerDataset, indexer_config, params, n_hard: int, path: str, *,
                        impl: str = "auto", progress: bool = True, source: str = "") -> str:
    """For every query keep the ``n_hard`` highest-scoring non-positive candidates under ``params``
    (ensemble score) and write them as per-document CSR to ``path`` (safetensors)."""
    from train.evaluate import iter_document_scores

    tensors = {}
    it = range(dataset.n_docs)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="mine hard negatives", unit="doc")
    for di in it:
        doc = dataset.doc(di)
        idx, ptr = [], [0]
        for q0, scores, _ in iter_document_scores(params, indexer_config, doc, impl=impl):
            for q in range(q0, q0 + len(scores)):
                n = int(doc.n_candidates[q])
                s = np.asarray(scores[q - q0, :n], np.float64).copy()
                s[doc.labels.row(q)[0]] = -np.inf
                order = np.argsort(-s, kind="stable")[:n_hard]
                order = order[np.isfinite(s[order])]
                idx.append(order.astype(np.int32))
                ptr.append(ptr[-1] + len(order))
        tensors[f"{doc.doc_id}/indices"] = np.concatenate(idx) if idx else np.zeros(0, np.int32)
        tensors[f"{doc.doc_id}/pointers"] = np.asarray(ptr, np.int64)
    save_shard(path, tensors, {"format": HARD_FORMAT, "n_hard": n_hard, "source": source})
    return path


def load_hard_negatives(path: str, doc_ids: Sequence[str]) -> list[CSR]:
    t, meta = load_shard(path)
    if meta.get("format") != HARD_FORMAT:
        raise ShardError(f"{path}: not a hard-negative file (format {meta.get('format')!r})")
    out = []
    for d in doc_ids:
        if f"{d}/indices" not in t or f"{d}/pointers" not in t:
            raise ShardError(f"{path}: no hard negatives for document {d!r}")
        idx = np.asarray(t[f"{d}/indices"], np.int32)
        out.append(CSR(idx, np.zeros(len(idx), np.float32), np.asarray(t[f"{d}/pointers"], np.int64)))
    return out


# ---------------------------------------------------------------------------------------------------
# fixed-shape batches
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplerConfig:
    batch_size: int = 32
    neg_ratio: float = 1.0
    min_neg: int = 8
    n_hard: int = 0
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    seed: int = 0
    soft_labels: bool = False

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.neg_ratio < 0 or self.min_neg < 0 or self.n_hard < 0:
            raise ValueError("neg_ratio, min_neg and n_hard must be >= 0")
        if not self.buckets or any(b <= 0 for b in self.buckets) or list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"buckets must be strictly increasing positive sizes, got {self.buckets}")


def _composition(cfg: SamplerConfig, n_pos: int, n_cand: int, n_hard_avail: int) -> tuple[int, int, int]:
    """(positives, hard negatives, random negatives) kept for one sample; fits the largest bucket."""
    cap = cfg.buckets[-1]
    n_neg_avail = n_cand - n_pos
    p = min(n_pos, cap)
    h = min(cfg.n_hard, n_hard_avail, n_neg_avail, cap - p)
    want = max(cfg.min_neg, math.ceil(cfg.neg_ratio * n_pos))
    r = max(0, min(want, n_neg_avail - h, cap - p - h))
    return p, h, r


@dataclass
class _Epoch:
    batches: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (bucket, sample indices)


class BatchStream:
    """Deterministic stream of fixed-shape batches; ``batch(step)`` is a pure function of the step.

    Training (``drop_remainder=True``): each epoch shuffles the samples, groups them by bucket in that
    order and emits a batch whenever a bucket fills; partial buckets at the end of an epoch are dropped.
    Evaluation (``shuffle=False, drop_remainder=False``): every sample once, partial batches padded with
    weight-0 samples.
    """

    def __init__(self, dataset: IndexerDataset, cfg: SamplerConfig, *, shuffle: bool = True,
                 drop_remainder: bool = True):
        self.ds, self.cfg = dataset, cfg
        self.shuffle, self.drop_remainder = shuffle, drop_remainder
        n = len(dataset)
        hard_avail = np.zeros(n, np.int64)
        if dataset.hard is not None:
            for i, (di, q) in enumerate(dataset.samples):
                hard_avail[i] = len(dataset.hard_row(int(di), int(q)))
        sizes = np.zeros(n, np.int64)
        for i in range(n):
            sizes[i] = sum(_composition(cfg, int(dataset.pos_counts[i]), int(dataset.cand_counts[i]),
                                        int(hard_avail[i])))
        self._hard_avail = hard_avail
        self.sample_bucket = np.asarray([cfg.buckets[bisect.bisect_left(cfg.buckets, max(int(s), 1))]
                                         for s in sizes], np.int64)
        self._epochs: list[_Epoch] = []
        self._starts: list[int] = [0]  # global step at which each epoch starts
        self._plan_lock = threading.RLock()

    def epoch_plan(self, epoch: int) -> _Epoch:
        with self._plan_lock:
            return self._epoch_plan(epoch)

    def _epoch_plan(self, epoch: int) -> _Epoch:
        while len(self._epochs) <= epoch:
            e = len(self._epochs)
            n = len(self.ds)
            order = np.random.default_rng([self.cfg.seed, e]).permutation(n) if self.shuffle else np.arange(n)
            pending: dict[int, list[int]] = {}
            plan = _Epoch()
            for s in order:
                b = int(self.sample_bucket[s])
                lst = pending.setdefault(b, [])
                lst.append(int(s))
                if len(lst) == self.cfg.batch_size:
                    plan.batches.append((b, np.asarray(lst, np.int64)))
                    pending[b] = []
            if not self.drop_remainder:
                for b in sorted(pending):
                    if pending[b]:
                        plan.batches.append((b, np.asarray(pending[b], np.int64)))
            if not plan.batches:
                raise ValueError(f"an epoch yields no batch: {n} samples, batch size {self.cfg.batch_size} "
                                 f"(bucket counts {np.unique(self.sample_bucket, return_counts=True)}); "
                                 "lower --batch-size or dump more documents")
            self._epochs.append(plan)
            self._starts.append(self._starts[-1] + len(plan.batches))
        return self._epochs[epoch]

    def __len__(self) -> int:
        """Batches per epoch (of epoch 0; later epochs differ slightly when dropping remainders)."""
        return len(self.epoch_plan(0).batches)

    def locate(self, step: int) -> tuple[int, int]:
        """Global step -> (epoch, batch index in that epoch)."""
        e = 0
        with self._plan_lock:
            while True:
                self._epoch_plan(e)
                if step < self._starts[e + 1]:
                    return e, step - self._starts[e]
                e += 1

    def batch(self, step: int) -> dict[str, np.ndarray]:
        epoch, i = self.locate(step)
        bucket, ids = self.epoch_plan(epoch).batches[i]
        return self.make_batch(ids, bucket, epoch)

    def make_batch(self, sample_ids: np.ndarray, bucket: int, epoch: int) -> dict[str, np.ndarray]:
        ds, cfg = self.ds, self.cfg
        layers = ds.target_layers
        bsz, m = cfg.batch_size, bucket
        n_real = len(sample_ids)
        d = int(ds.manifest["d_model"])
        kb = int(ds.manifest["index_key_bytes"])
        score_max = float(ds.manifest.get("label_score_max") or 1.0)  # soft labels: layer count -> [0, 1]
        first = ds.doc(int(ds.samples[sample_ids[0]][0]))
        hdt = first.hidden[layers[0]].dtype
        out = {
            "hidden": np.zeros((bsz, len(layers), d), hdt),
            "keys": np.zeros((bsz, len(layers), m, kb), np.uint8),
            "positions": np.zeros((bsz,), np.int32),
            "labels": np.zeros((bsz, m), np.float32),
            "mask": np.zeros((bsz, m), bool),
            "lengths": np.zeros((bsz,), np.int32),
            "weight": np.zeros((bsz,), np.float32),
            "entry_ids": np.full((bsz, m), -1, np.int32),
        }
        for j, s in enumerate(sample_ids):
            di, q = (int(x) for x in ds.samples[s])
            doc = ds.doc(di)
            rng = np.random.default_rng([cfg.seed, epoch, int(s)])
            n = int(doc.n_candidates[q])
            pos, pscore = doc.labels.row(q)
            taken = np.zeros(n, bool)
            taken[pos] = True  # every positive, also those left out below, is never a negative
            hard = ds.hard_row(di, q)
            if len(hard):
                hard = hard[(hard >= 0) & (hard < n)]
                hard = hard[~taken[hard]]
            p, h, r = _composition(cfg, len(pos), n, len(hard))
            r = max(0, min(r, m - p - h))
            if p < len(pos):
                keep = np.sort(rng.choice(len(pos), p, replace=False))
                pos, pscore = pos[keep], pscore[keep]
            hard = hard[:h]
            taken[hard] = True
            free = np.flatnonzero(~taken)
            neg = rng.choice(free, r, replace=False) if r else np.zeros(0, np.int64)
            ids = np.concatenate([pos, hard, neg]).astype(np.int64)
            k = len(ids)
            lab = np.zeros(k, np.float32)
            lab[:p] = pscore / score_max if cfg.soft_labels else 1.0
            out["entry_ids"][j, :k] = ids
            out["labels"][j, :k] = lab
            out["mask"][j, :k] = True
            out["lengths"][j] = k
            out["positions"][j] = doc.positions[q]
            out["weight"][j] = 1.0
            row = doc.hidden_rows[q]
            for li, lyr in enumerate(layers):
                out["hidden"][j, li] = doc.hidden[lyr][row]
                out["keys"][j, li, :k] = doc.keys[lyr][ids]
        if n_real < bsz:  # padding samples: copy sample 0's inputs, weight 0, nothing valid
            for key in ("hidden", "keys", "positions"):
                out[key][n_real:] = out[key][0]
        return out


# ---------------------------------------------------------------------------------------------------
# host-side prefetch
# ---------------------------------------------------------------------------------------------------
class Prefetcher:
    """Builds ``fn(step)`` for ``steps`` on background threads, ``depth`` results ahead, in step order.

    ``workers`` > 1 builds several steps concurrently (``fn`` must be thread-safe; numpy's gathers release
    the GIL). Iterating yields ``(step, value)``; an exception in a worker is re-raised in the consumer.
    """

    _DONE = object()

    def __init__(self, fn: Callable[[int], object], steps: Iterable[int], depth: int = 4, workers: int = 1):
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._steps = list(steps)
        self._fn = fn
        self._workers = max(1, workers)
        self._depth = max(1, depth)
        self._t = threading.Thread(target=self._run, name="batch-prefetch", daemon=True)
        self._t.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        try:
            if self._workers == 1:
                for s in self._steps:
                    if self._stop.is_set() or not self._put((s, self._fn(s))):
                        return
            else:
                with ThreadPoolExecutor(self._workers, thread_name_prefix="batch-worker") as ex:
                    pending: deque = deque()
                    it = iter(self._steps)
                    for s in it:
                        pending.append((s, ex.submit(self._fn, s)))
                        if len(pending) >= self._workers + self._depth:
                            break
                    while pending:
                        s, fut = pending.popleft()
                        if self._stop.is_set() or not self._put((s, fut.result())):
                            for _, f in pending:
                                f.cancel()
                            return
                        nxt = next(it, None)
                        if nxt is not None:
                            pending.append((nxt, ex.submit(self._fn, nxt)))
        except BaseException as e:  # noqa: BLE001 (forwarded to the consumer)
            self._put(("error", e))
            return
        self._put(self._DONE)

    def __iter__(self):
        while True:
            item = self._q.get()
            if item is self._DONE:
                return
            if item[0] == "error":
                raise item[1]
            yield item

    def close(self):
        self._stop.set()
        self._t.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def close_loop(prefetcher, manager, bar=None) -> None:
    """End a training loop: stop the batch prefetcher, wait for the orbax manager's pending saves, close the
    progress bar (shared by `train.fit` and `train.pretrain`, in their `finally`)."""
    prefetcher.close()
    manager.wait_until_finished()
    if bar is not None:
        bar.close()
