"""Import the FlashMemory release's own training dumps (``doc_*.pkl``) into our shard format, safely:
``python -m train.pickle_import``.

**The release's layout** (``_flush_one_training_state`` in its sglang fork's ``deepseek_v4.py``): one
pickle per request, ``pickle.dump`` of a dict of *torch tensors*, one row per decode token::

    hidden_layer_{i}     bf16  [n_decode, d]       the indexer input x of each decode token, CSA layer i
    positions_layer_{i}  int64 [n_decode]          each decode token's absolute position
    compk_layer_{i}      uint8 [n_blocks, 132]     the prompt's packed index keys (128 fp8 + fp32 scale; stored
                                                   here page-blocked as our dumps are: ``train.data.stored_keys``)
    label_indices        int32 [nnz]               CSR per decode token: golden chunks (top-p 0.6, >= 3 layers)
    label_scores         int32 [nnz]               their layer counts
    label_pointers       int32 [n_decode + 1]
    logits_layer_{i}_token_{j}, q_layer_{i}_token_{j}, weights_layer_{i}_token_{j}   (j < 3; ignored here)

``i`` is the release's CSA-layer number (its retrievers' ``l{i}`` names), kept as our target-layer id.
Samples are built as the release's dataloader builds them (``training/dataloader.py``): decode row ``t``
(every ``--sample-interval`` rows) is a query with the hidden state of row ``t`` at position
``positions[t]``; its positives are the union of the label rows ``[t, min(t + tau, n_decode))`` restricted
to the prompt's blocks (``< n_blocks``), each with its maximum layer count (the release's weighted loss);
its candidates are all ``n_blocks`` prompt blocks (manifest ``"candidates": "stored"``). Rows whose union
holds no prompt block are dropped (the release substitutes a random pseudo-positive).

**Safety.** Pickles can run arbitrary code on load, so they are read with a *restricted* unpickler and
without torch: the only callables it resolves are our own stand-ins for torch's tensor rebuilder
(``torch._utils._rebuild_tensor_v2``), its storage loader (``torch.storage._load_from_bytes``, whose
payload is torch's legacy storage format: a few plain pickles, then each storage as an int64 element
count and its raw little-endian bytes, parsed here with ``numpy.frombuffer``), ``collections.OrderedDict``
(the empty backward-hook dict), the numpy reconstructors of plain arrays and the torch storage type names;
any other global (``os.system``, ``builtins.eval``, ...) and any persistent id at the top level are
refused with ``RefusedPickle`` *before* anything is called. After loading, the top level must be a dict of
str keys to numeric arrays.

Example::

    python -m train.pickle_import --out /tmp/fm_import --tau 64 /data/flashmemory/doc_*.pkl
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pickle
import re
import sys

import ml_dtypes
import numpy as np

from fm_jax import cli
from train import data as D
from train.labels import CSR, validate_csr, window_union

_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
ALLOWED_NUMPY_GLOBALS = frozenset(
    [(m, "_reconstruct") for m in _NUMPY_MODULES]
    + [(m, "scalar") for m in _NUMPY_MODULES]
    + [("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")]
    + [("ml_dtypes", n) for n in ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                  "float8_e5m2fnuz", "float8_e4m3b11fnuz")]
)
# torch's legacy storage classes (``torch.<Name>Storage``) -> the numpy dtype of their elements
TORCH_STORAGE_DTYPES = {
    "ByteStorage": np.uint8, "CharStorage": np.int8, "ShortStorage": np.int16, "IntStorage": np.int32,
    "LongStorage": np.int64, "HalfStorage": np.float16, "FloatStorage": np.float32,
    "DoubleStorage": np.float64, "BFloat16Storage": ml_dtypes.bfloat16, "BoolStorage": np.bool_,
    "Float8_e4m3fnStorage": ml_dtypes.float8_e4m3fn, "Float8_e5m2Storage": ml_dtypes.float8_e5m2,
}
_LEGACY_MAGIC, _LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001


class RefusedPickle(pickle.UnpicklingError):
    """A pickle that holds (or would build) anything but plain numeric arrays / torch tensors."""


class _Storage:
    """A torch storage read from its legacy serialisation: ``data`` is a 1-D numpy array."""

    def __init__(self, data: np.ndarray):
        self.data = data


def _int_tuple(x, what: str, where: str) -> tuple[int, ...]:
    if not isinstance(x, tuple) or not all(isinstance(v, int) and not isinstance(v, bool) for v in x):
        raise RefusedPickle(f"{where}: tensor {what} must be a tuple of ints, got {x!r}")
    return x


def _rebuild_tensor(where: str):
    def rebuild(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None, *extra):
        if not isinstance(storage, _Storage) or not isinstance(offset, int) or extra:
            raise RefusedPickle(f"{where}: malformed torch tensor")
        if hooks and len(hooks):
            raise RefusedPickle(f"{where}: a torch tensor carries backward hooks")
        size, stride = _int_tuple(size, "size", where), _int_tuple(stride, "stride", where)
        data = storage.data
        if len(size) != len(stride) or offset < 0 or any(v < 0 for v in size + stride):
            raise RefusedPickle(f"{where}: malformed torch tensor (size {size}, stride {stride}, offset {offset})")
        last = offset + sum((n - 1) * st for n, st in zip(size, stride)) if all(size) else offset - 1
        if last >= len(data):
            raise ValueError(f"{where}: a tensor of size {size} reads past its storage of {len(data)} elements")
        view = np.lib.stride_tricks.as_strided(data[offset:] if len(data) else data, size,
                                               [st * data.itemsize for st in stride], writeable=False)
        return np.array(view)
    return rebuild


class _LegacyStorageUnpickler(pickle.Unpickler):
    """The pickles inside torch's legacy storage format: storage type names and persistent storage ids."""

    def __init__(self, f, where: str, refs: dict):
        super().__init__(f)
        self._where, self._refs = where, refs

    def find_class(self, module, name):
        if module == "torch" and name in TORCH_STORAGE_DTYPES:
            return ("storage_type", name)
        raise RefusedPickle(f"{self._where}: refused to load: a tensor storage references {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], tuple) and pid[1][0] == "storage_type"
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise RefusedPickle(f"{self._where}: unsupported persistent id in a tensor storage: {pid!r:.80}")
        if len(pid) == 6 and pid[5] is not None:
            raise RefusedPickle(f"{self._where}: storage views are not supported")
        ref = self._refs.setdefault(pid[2], [TORCH_STORAGE_DTYPES[pid[1][1]], pid[4], None])
        return ref


def _load_legacy_storage(where: str):
    def load(b):
        if not isinstance(b, bytes):
            raise RefusedPickle(f"{where}: a torch storage payload is not bytes")
        f = io.BytesIO(b)
        refs: dict = {}

        def plain():
            return _LegacyStorageUnpickler(f, where, refs).load()

        if plain() != _LEGACY_MAGIC or plain() != _LEGACY_PROTOCOL:
            raise ValueError(f"{where}: a torch storage is not in torch's legacy serialisation format")
        info = plain()
        if not isinstance(info, dict) or not info.get("little_endian", False):
            raise ValueError(f"{where}: big-endian torch storages are not supported")
        root = plain()
        keys = plain()
        if not isinstance(keys, list) or sorted(keys) != sorted(refs):
            raise ValueError(f"{where}: torch storage keys {keys!r:.60} do not match its references")
        for key in keys:
            dtype, numel, _ = refs[key]
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"{where}: truncated torch storage")
            n = int(np.frombuffer(head, "<i8")[0])
            nbytes = n * np.dtype(dtype).itemsize
            raw = f.read(nbytes)
            if n != numel or len(raw) != nbytes:
                raise ValueError(f"{where}: torch storage {key} holds {len(raw)} of {numel} elements' bytes")
            refs[key][2] = np.frombuffer(raw, dtype)
        if not any(root is r for r in refs.values()):
            raise RefusedPickle(f"{where}: a torch storage payload holds something other than one storage")
        return _Storage(root[2])
    return load


class _ArrayUnpickler(pickle.Unpickler):
    def __init__(self, f, where: str):
        super().__init__(f)
        self._where = where
        self._torch = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor(where),
                       ("torch.storage", "_load_from_bytes"): _load_legacy_storage(where),
                       ("collections", "OrderedDict"): collections.OrderedDict}

    def find_class(self, module, name):
        if (module, name) in self._torch:
            return self._torch[(module, name)]
        if (module, name) in ALLOWED_NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise RefusedPickle(f"{self._where}: refused to load: the pickle references the global "
                            f"{module}.{name}; only arrays, torch tensors and plain numbers are accepted")

    def persistent_load(self, pid):
        raise RefusedPickle(f"{self._where}: refused to load: the pickle uses persistent ids (torch.save's "
                            "zip format?); the release's dumps are plain pickles")


def _as_array(key: str, value, where: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        arr = value
    elif isinstance(value, (np.generic, int, float, bool)) and not isinstance(value, (str, bytes)):
        arr = np.asarray(value)
    elif isinstance(value, (list, tuple)):
        if not all(isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) for x in value):
            raise RefusedPickle(f"{where}: key {key!r} holds a list with non-numeric items; only arrays are accepted")
        arr = np.asarray(value)
    else:
        raise RefusedPickle(f"{where}: key {key!r} holds a {type(value).__name__}; only arrays are accepted")
    if arr.dtype.kind not in "biuf" and arr.dtype.name not in ("bfloat16",) and not arr.dtype.name.startswith("float8"):
        raise RefusedPickle(f"{where}: key {key!r} has dtype {arr.dtype}; only numeric arrays are accepted")
    return arr


def safe_load_pickle(path: str, max_bytes: int = 1 << 36) -> dict[str, np.ndarray]:
    """Load a pickle of ``{str: array}`` with the restricted unpickler (see the module docstring)."""
    size = os.path.getsize(path)
    if size > max_bytes:
        raise RefusedPickle(f"{path}: {size} bytes exceed the limit of {max_bytes}")
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"PK":
        raise RefusedPickle(f"{path}: a zip archive (torch.save?), not a plain pickle of numpy arrays")
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), path).load()
    except RefusedPickle:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, UnicodeDecodeError) as e:  # truncated / corrupted data
        raise ValueError(f"{path}: cannot unpickle: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise RefusedPickle(f"{path}: top level is a {type(obj).__name__}, expected a dict of arrays")
    out = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise RefusedPickle(f"{path}: dict key {k!r} is not a string")
        out[k] = _as_array(k, v, path)
    return out


_LAYER_RE = re.compile(r"^hidden_layer_(\d+)$")
RELEASE_TAU = 64  # the release's label_interval
RELEASE_PAGE_ENTRIES = 64  # V4-Flash's CSA page (`fm_jax.config` preset v4_flash): the stored key pages


def _vector(arrays, name: str, where: str) -> np.ndarray:
    if name not in arrays:
        raise ValueError(f"{where}: missing {name!r} (not a FlashMemory release dump?)")
    a = arrays[name]
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise ValueError(f"{where}: {name} must be a 1-D integer tensor, got {a.dtype}{a.shape}")
    return a.astype(np.int64)


def convert_document(arrays: dict[str, np.ndarray], where: str, *, tau: int = RELEASE_TAU,
                     sample_interval: int = 1, page_entries: int = RELEASE_PAGE_ENTRIES) -> tuple[dict, dict]:
    """One release dump -> (our shard tensors, facts for the manifest). See the module docstring; the
    release's key rows are stored page-blocked (``page_entries`` per page)."""
    if tau <= 0 or sample_interval <= 0:
        raise ValueError(f"tau={tau} and sample_interval={sample_interval} must be positive")
    layers = sorted(int(m.group(1)) for k in arrays if (m := _LAYER_RE.match(k)))
    if not layers:
        raise ValueError(f"{where}: no hidden_layer_{{i}} tensors (keys: {sorted(arrays)[:8]})")
    ptr = _vector(arrays, "label_pointers", where)
    idx = _vector(arrays, "label_indices", where)
    score = _vector(arrays, "label_scores", where)
    n_decode = len(ptr) - 1
    rows = CSR(idx.astype(np.int32), score.astype(np.float32), ptr)
    try:
        validate_csr(rows, np.full(max(n_decode, 0), np.iinfo(np.int32).max), where)
    except ValueError as e:
        raise ValueError(f"{e} (label rows of the decode tokens)") from None
    positions = n_blocks = d_model = kb = None
    hidden, keys = {}, {}
    for lyr in layers:
        h = arrays[f"hidden_layer_{lyr}"]
        pos = _vector(arrays, f"positions_layer_{lyr}", where)
        if f"compk_layer_{lyr}" not in arrays:
            raise ValueError(f"{where}: missing 'compk_layer_{lyr}'")
        k = arrays[f"compk_layer_{lyr}"]
        if h.ndim != 2 or h.shape[0] != n_decode or h.dtype.kind != "f" and h.dtype.name != "bfloat16":
            raise ValueError(f"{where}: hidden_layer_{lyr} must be float [n_decode={n_decode}, d], got "
                             f"{h.dtype}{h.shape}")
        if len(pos) != n_decode:
            raise ValueError(f"{where}: positions_layer_{lyr} has {len(pos)} rows, label_pointers {n_decode}")
        if k.dtype.itemsize == 1 and k.dtype != np.uint8:
            k = k.view(np.uint8)  # fp8 bytes of the packed keys
        if k.ndim != 2 or k.dtype != np.uint8:
            raise ValueError(f"{where}: compk_layer_{lyr} must be uint8 [n_blocks, D + 4], got {k.dtype}{k.shape}")
        if positions is None:
            positions, n_blocks, d_model, kb = pos, k.shape[0], h.shape[1], k.shape[1]
        elif not np.array_equal(pos, positions) or (k.shape[0], h.shape[1], k.shape[1]) != (n_blocks, d_model, kb):
            raise ValueError(f"{where}: layer {lyr}'s positions / dims differ from layer {layers[0]}'s")
        hidden[lyr], keys[lyr] = h, k
    if n_decode and (positions.min() < 0 or np.any(np.diff(positions) <= 0)):
        raise ValueError(f"{where}: positions_layer_* must be non-negative and increasing")
    t = np.arange(0, n_decode, sample_interval, dtype=np.int64)
    labels = window_union(rows, t, np.minimum(t + tau, n_decode), np.full(len(t), n_blocks))
    keep = labels.row_sizes() > 0
    t = t[keep]
    labels = window_union(rows, t, np.minimum(t + tau, n_decode), np.full(len(t), n_blocks))
    tensors = {"query_positions": positions[t].astype(np.int32), "label_indices": labels.indices,
               "label_scores": labels.scores, "label_pointers": labels.pointers}
    for lyr in layers:
        tensors[f"hidden_layer_{lyr}"] = np.asarray(hidden[lyr][t]).astype(ml_dtypes.bfloat16)
        tensors[f"compk_layer_{lyr}"] = D.stored_keys(keys[lyr], page_entries)
    facts = {"layers": layers, "d_model": int(d_model), "index_key_bytes": int(kb), "n_entries": int(n_blocks),
             "n_queries": len(t), "n_positives": len(labels.indices), "n_decode": int(n_decode),
             "n_tokens": int(positions[-1]) + 1 if n_decode else 0,
             "label_score_max": int(score.max()) if len(score) else 0}
    return tensors, facts


def import_pickles(paths, out_dir: str, *, tau: int = RELEASE_TAU, sample_interval: int = 1, ratio: int = 4,
                   n_vote_layers: int = 21, progress: bool = True, page_entries: int = RELEASE_PAGE_ENTRIES) -> dict:
    """Import release dumps into ``out_dir`` (train.data format); reruns skip finished documents.
    ``page_entries``: entries per stored key page (the release's V4 pages by default)."""
    os.makedirs(out_dir, exist_ok=True)
    D.pin_settings(os.path.join(out_dir, "import_settings.json"),
                   {"tau": tau, "sample_interval": sample_interval, "ratio": ratio, "n_vote_layers": n_vote_layers},
                   ("tau", "sample_interval", "ratio", "n_vote_layers"),
                   f"{out_dir} holds an import made with different settings")
    it = paths
    if progress:
        from tqdm import tqdm
        it = tqdm(paths, desc="import", unit="doc")
    docs, common = [], None
    for path in it:
        doc_id = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.splitext(os.path.basename(path))[0])
        fname = f"doc_{doc_id}.safetensors"
        side = os.path.join(out_dir, f"doc_{doc_id}.json")
        if os.path.exists(side):
            with open(side) as f:
                entry = json.load(f)
            # a document imported before the page-blocked key layout is imported again
            if os.path.exists(os.path.join(out_dir, fname)) and entry.get("key_layout") == "pages" and \
                    entry.get("key_page_entries") == page_entries and \
                    os.path.getsize(os.path.join(out_dir, fname)) == entry.get("bytes"):
                docs.append(entry)
                common = common or entry["_facts"]
                continue
        tensors, facts = convert_document(safe_load_pickle(path), path, tau=tau, sample_interval=sample_interval,
                                          page_entries=page_entries)
        if facts["label_score_max"] > n_vote_layers:
            raise ValueError(f"{path}: a label score of {facts['label_score_max']} layers exceeds "
                             f"--n-vote-layers={n_vote_layers}")
        shared = {k: facts[k] for k in ("layers", "d_model", "index_key_bytes")}
        if common is None:
            common = shared
        elif shared != common:
            raise ValueError(f"{path}: layers / dims {shared} differ from earlier documents' {common}")
        info = D.save_shard(os.path.join(out_dir, fname), tensors, {"format": D.FORMAT, "doc_id": doc_id})
        entry = {"id": doc_id, "file": fname, **info, **D.key_layout_fields(page_entries),
                 "source": os.path.abspath(path), "_facts": shared,
                 **{k: facts[k] for k in ("n_tokens", "n_entries", "n_queries", "n_positives", "n_decode")}}
        D.atomic_write_json(side, entry)
        docs.append(entry)
    if common is None:
        raise ValueError("no documents to import")
    manifest = {"format": D.FORMAT, "version": D.VERSION, "source": "flashmemory-release-pickle",
                "ratio": ratio, "tau": tau, "sample_interval": sample_interval, "min_layers": None,
                "vote_layers": None, "target_layers": common["layers"], "d_model": common["d_model"],
                "index_key_bytes": common["index_key_bytes"], **D.key_layout_fields(page_entries),
                "hidden_rows": "queries", "hidden_dtype": "bfloat16",
                "candidates": "stored", "label_score": "layer_count", "label_score_max": n_vote_layers,
                "query": "decode row t: positives from rows [t, t + tau) (the release's dataloader)",
                "li_init": None, "docs": sorted(docs, key=lambda d: d["id"]),
                "totals": {"docs": len(docs), "queries": int(sum(d["n_queries"] for d in docs)),
                           "positives": int(sum(d["n_positives"] for d in docs))}}
    D.atomic_write_json(os.path.join(out_dir, D.MANIFEST), manifest)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m train.pickle_import", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("pickles", nargs="+", type=cli.existing_file, help="the release's doc_*.pkl files")
    p.add_argument("--out", required=True, help="output directory (train.data format)")
    p.add_argument("--tau", type=cli.positive_int, default=RELEASE_TAU,
                   help="label window in decode rows (the release: 64)")
    p.add_argument("--sample-interval", type=cli.positive_int, default=1, help="every N-th decode row is a query")
    p.add_argument("--ratio", type=cli.positive_int, default=4, help="tokens per compressed CSA entry")
    p.add_argument("--n-vote-layers", type=cli.positive_int, default=21,
                   help="CSA layers that voted (the largest possible label score; V4: 21)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    m = import_pickles(args.pickles, args.out, tau=args.tau, sample_interval=args.sample_interval, ratio=args.ratio,
                       n_vote_layers=args.n_vote_layers, progress=not args.no_progress)
    print(json.dumps(m["totals"]), file=sys.stderr)
    return m


if __name__ == "__main__":
    sys.exit(cli.run(main))
