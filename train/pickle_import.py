"""Import the public FlashMemory ``doc_*.pkl`` training dumps into our shard format, safely:
``python -m train.pickle_import``.

A FlashMemory dump is one pickle per document holding a dict of arrays: ``hidden_layer_{L}`` (hidden
states of target layer L), ``compk_layer_{L}`` (its packed index keys, ``[N, D + 4]`` uint8, or float
``[N, D]`` keys that are packed here), and CSR labels ``label_indices`` / ``label_scores`` /
``label_pointers``. Optional: ``query_positions`` (or ``positions``); without it the query positions are
the grid ``first_query + q * tau`` (``--tau``, ``--first-query``).

Pickles can run arbitrary code on load, so they are read with a *restricted* unpickler that resolves
only the handful of numpy / ml_dtypes callables needed to rebuild plain arrays (``_reconstruct``,
``ndarray``, ``dtype``, ``scalar``, ``_frombuffer``, ``_codecs.encode``); any other global (``os.system``,
``builtins.eval``, torch's tensor rebuilders, ...) and any persistent id are refused with
``RefusedPickle`` *before* anything is called. After loading, the top level must be a dict of str keys to
numeric arrays (or numbers / lists of numbers); object arrays and anything else are refused as well.

Hidden rows: ``--hidden-rows auto`` stores per-query rows when ``hidden_layer_*`` has exactly Q rows and a
query position lies beyond them, else rows indexed by position.

Example::

    python -m train.pickle_import --out /tmp/fm_import --ratio 4 --tau 64 /data/flashmemory/doc_*.pkl
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import re
import sys

import numpy as np

from fm_jax import cli
from train import data as D
from train.labels import CSR, validate_csr

_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
ALLOWED_GLOBALS = frozenset(
    [(m, "_reconstruct") for m in _NUMPY_MODULES]
    + [(m, "scalar") for m in _NUMPY_MODULES]
    + [("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")]
    + [("ml_dtypes", n) for n in ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                  "float8_e5m2fnuz", "float8_e4m3b11fnuz")]
)


class RefusedPickle(pickle.UnpicklingError):
    """A pickle that holds (or would build) anything but plain numeric arrays."""


class _ArrayUnpickler(pickle.Unpickler):
    def __init__(self, f, where: str):
        super().__init__(f)
        self._where = where

    def find_class(self, module, name):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise RefusedPickle(f"{self._where}: refused to load: the pickle references the global "
                            f"{module}.{name}; only numpy arrays and plain numbers are accepted")

    def persistent_load(self, pid):
        raise RefusedPickle(f"{self._where}: refused to load: the pickle uses persistent ids (e.g. torch "
                            "tensors); convert the dump to numpy arrays first")


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


_LAYER_RE = re.compile(r"^(hidden|compk)_layer_(\d+)$")


def convert_document(arrays: dict[str, np.ndarray], where: str, *, ratio: int, tau: int | None,
                     first_query: int | None, hidden_rows: str = "auto") -> tuple[dict, dict]:
    """FlashMemory arrays -> (our shard tensors, facts for the manifest)."""
    from fm_jax.layers.quant import pack_index_keys

    layers = sorted({int(m.group(2)) for k in arrays if (m := _LAYER_RE.match(k))})
    if not layers:
        raise ValueError(f"{where}: no hidden_layer_{{L}} / compk_layer_{{L}} arrays (keys: {sorted(arrays)[:8]})")
    for name in ("label_indices", "label_scores", "label_pointers"):
        if name not in arrays:
            raise ValueError(f"{where}: missing {name!r}")
    ptr = arrays["label_pointers"].astype(np.int64).reshape(-1)
    q = len(ptr) - 1
    if "query_positions" in arrays or "positions" in arrays:
        pos = arrays.get("query_positions", arrays.get("positions")).astype(np.int64).reshape(-1)
    elif tau:
        start = tau if first_query is None else first_query
        pos = start + tau * np.arange(q, dtype=np.int64)
    else:
        raise ValueError(f"{where}: no query_positions in the pickle; pass --tau (and --first-query) to "
                         "place the queries on a grid")
    if len(pos) != q:
        raise ValueError(f"{where}: {len(pos)} query positions but label_pointers describes {q} queries")
    tensors: dict[str, np.ndarray] = {}
    d_model = kb = None
    n_entries = None
    rows_mode = None
    for lyr in layers:
        h = arrays.get(f"hidden_layer_{lyr}")
        k = arrays.get(f"compk_layer_{lyr}")
        if h is None or k is None:
            raise ValueError(f"{where}: layer {lyr} needs both hidden_layer_{lyr} and compk_layer_{lyr}")
        h = h.reshape(-1, h.shape[-1]) if h.ndim == 3 and h.shape[0] == 1 else h
        k = k.reshape(-1, k.shape[-1]) if k.ndim == 3 and k.shape[0] == 1 else k
        if h.ndim != 2 or k.ndim != 2:
            raise ValueError(f"{where}: layer {lyr}: hidden {h.shape} / keys {k.shape} must be 2-D")
        if k.dtype != np.uint8:
            k = np.asarray(pack_index_keys(np.asarray(k, np.float32)))
        if d_model is None:
            d_model, kb, n_entries = h.shape[1], k.shape[1], k.shape[0]
        elif (h.shape[1], k.shape[1], k.shape[0]) != (d_model, kb, n_entries):
            raise ValueError(f"{where}: layer {lyr} dims differ from layer {layers[0]}'s")
        mode = hidden_rows
        if mode == "auto":
            mode = "queries" if h.shape[0] == q and q and pos.max() >= h.shape[0] else "positions"
        if rows_mode is None:
            rows_mode = mode
        elif mode != rows_mode:
            raise ValueError(f"{where}: layers disagree on the hidden row layout")
        import ml_dtypes
        tensors[f"hidden_layer_{lyr}"] = np.asarray(h).astype(ml_dtypes.bfloat16)
        tensors[f"compk_layer_{lyr}"] = np.ascontiguousarray(k, np.uint8)
    csr = CSR(arrays["label_indices"].astype(np.int32).reshape(-1),
              arrays["label_scores"].astype(np.float32).reshape(-1), ptr)
    n_cand = np.minimum(pos // ratio, n_entries)
    if q and (pos // ratio).max() > n_entries:
        raise ValueError(f"{where}: query position {int(pos.max())} needs {int(pos.max()) // ratio} entries, "
                         f"only {n_entries} stored (wrong --ratio / --tau?)")
    validate_csr(csr, n_cand, where)
    tensors.update(query_positions=pos.astype(np.int32), label_indices=csr.indices, label_scores=csr.scores,
                   label_pointers=csr.pointers)
    facts = {"layers": layers, "d_model": int(d_model), "index_key_bytes": int(kb), "hidden_rows": rows_mode,
             "n_entries": int(n_entries), "n_queries": int(q), "n_positives": len(csr.indices),
             "n_tokens": int(n_entries * ratio)}
    return tensors, facts


def import_pickles(paths, out_dir: str, *, ratio: int = 4, tau: int | None = None, first_query: int | None = None,
                   hidden_rows: str = "auto", progress: bool = True) -> dict:
    os.makedirs(out_dir, exist_ok=True)
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
            if os.path.exists(os.path.join(out_dir, fname)) and \
                    os.path.getsize(os.path.join(out_dir, fname)) == entry.get("bytes"):
                docs.append(entry)
                common = common or entry["_facts"]
                continue
        arrays = safe_load_pickle(path)
        tensors, facts = convert_document(arrays, path, ratio=ratio, tau=tau, first_query=first_query,
                                          hidden_rows=hidden_rows)
        shared = {k: facts[k] for k in ("layers", "d_model", "index_key_bytes", "hidden_rows")}
        if common is None:
            common = shared
        elif shared != common:
            raise ValueError(f"{path}: layers / dims / row layout {shared} differ from earlier documents' {common}")
        info = D.save_shard(os.path.join(out_dir, fname), tensors, {"format": D.FORMAT, "doc_id": doc_id})
        entry = {"id": doc_id, "file": fname, **info, "source": os.path.abspath(path), "_facts": shared,
                 **{k: facts[k] for k in ("n_tokens", "n_entries", "n_queries", "n_positives")}}
        D.atomic_write_json(side, entry)
        docs.append(entry)
    if common is None:
        raise ValueError("no documents to import")
    manifest = {"format": D.FORMAT, "version": D.VERSION, "source": "flashmemory-pickle", "ratio": ratio,
                "tau": tau, "min_layers": None, "vote_layers": None, "target_layers": common["layers"],
                "d_model": common["d_model"], "index_key_bytes": common["index_key_bytes"],
                "hidden_rows": common["hidden_rows"], "hidden_dtype": "bfloat16", "li_init": None,
                "docs": sorted(docs, key=lambda d: d["id"]),
                "totals": {"docs": len(docs), "queries": int(sum(d["n_queries"] for d in docs)),
                           "positives": int(sum(d["n_positives"] for d in docs))}}
    D.atomic_write_json(os.path.join(out_dir, D.MANIFEST), manifest)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m train.pickle_import", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("pickles", nargs="+", type=cli.existing_file, help="FlashMemory doc_*.pkl files")
    p.add_argument("--out", required=True, help="output directory (train.data format)")
    p.add_argument("--ratio", type=cli.positive_int, default=4, help="tokens per compressed CSA entry")
    p.add_argument("--tau", type=cli.positive_int, default=None,
                   help="query grid step when the pickles carry no positions")
    p.add_argument("--first-query", type=cli.nonneg_int, default=None, help="first query position (default: tau)")
    p.add_argument("--hidden-rows", default="auto", choices=("auto", "positions", "queries"))
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    m = import_pickles(args.pickles, args.out, ratio=args.ratio, tau=args.tau, first_query=args.first_query,
                       hidden_rows=args.hidden_rows, progress=not args.no_progress)
    print(json.dumps(m["totals"]), file=sys.stderr)
    return m


if __name__ == "__main__":
    sys.exit(cli.run(main))
