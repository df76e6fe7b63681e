"""Evaluate a Memory Indexer on dumped data: ``python -m train.evaluate``.

Every query of every evaluated document scores *all* its candidates (entries complete before the
query position) with the ensemble of the target layers' scorers. Reported (micro-averaged over all
query/candidate pairs):

* at the threshold (default 0.5): recall of the golden positives, precision, keep ratio (fraction of
  candidates kept), and the recency / random baselines at the *same per-query keep count*
  (random = its expectation, ``|P_q| * k_q / n_q``; recency = the ``k_q`` newest entries);
* the same at the threshold averaged per query (``query_recall``: mean over queries with positives of
  their recall; ``query_keep_ratio``: mean over queries of the fraction of their candidates kept). The pooled
  figures weigh a query by its positives and candidates, so a few queries with dense labels (near a
  document's start, where the backbone attends broadly) can dominate them; the per-query ones are what
  one decode window sees;
* ROC AUC of the scores against the labels;
* the recall vs keep-ratio curve: per query keep the ``ceil(rho * n_q)`` top-scoring entries, against
  recency (newest ``ceil(rho * n_q)``) and random (expectation) at each ``rho``.

Output: ``eval.json`` and (unless ``--no-plot``) ``recall_vs_keep.png`` (matplotlib, Agg backend;
matplotlib is optional and only needed for the plot).

Example::

    python -m train.evaluate --data /tmp/fm_data --ckpt /tmp/fm_run --out /tmp/fm_eval
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from fm_jax import cli, interop
from fm_jax import memory_indexer as mi
from pallas_kernels import indexer_scores
from train import data as D

KEEP_GRID = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
QUERY_CHUNK = 128
METRICS = ("recall", "precision", "keep_ratio", "query_recall", "query_keep_ratio", "auc")  # summaries


# ---------------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("c", "impl"))
def _multi_query_scores(layer_params, c, hidden, positions, keys, lengths, impl):
    """Scores of Q queries of one document against its N keys: [Q, N] (one key set shared by all
    queries; ``lengths`` [Q] masks entries not complete before each query)."""
    q, w = mi.query_tower(layer_params, c, hidden, positions)
    return indexer_scores(q[None], w[None], keys[None], lengths[None], act="sigmoid", impl=impl)[0]


def _pad_pow2(n: int, minimum: int = 64) -> int:
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def iter_document_scores(params, indexer_config: mi.IndexerConfig, doc: D.Doc, *, impl: str = "auto",
                         chunk: int = QUERY_CHUNK):
    """Yields ``(q0, ensemble [qn, N], {"l{ID}": [qn, N]})`` for consecutive chunks of ``doc``'s queries
    (sigmoid scores float32; columns >= n_candidates[q] are 0). Memory stays O(chunk * N)."""
    c = indexer_config
    q_total = len(doc.positions)
    n = doc.n_entries
    n_pad = _pad_pow2(max(n, 1))
    qc = min(chunk, _pad_pow2(max(q_total, 1), 8))
    keys = {}
    for lyr in c.target_layers:
        if lyr not in doc.keys:
            raise ValueError(f"document {doc.doc_id} has no data for target layer {lyr}")
        k = np.zeros((n_pad, doc.keys[lyr].shape[1]), np.uint8)
        k[:n] = doc.keys[lyr]
        keys[lyr] = jnp.asarray(k)
    for a in range(0, q_total, qc):
        b = min(q_total, a + qc)
        pos = np.zeros(qc, np.int32)
        pos[:b - a] = doc.positions[a:b]
        lens = np.zeros(qc, np.int32)
        lens[:b - a] = doc.n_candidates[a:b]
        pos, lens = jnp.asarray(pos), jnp.asarray(lens)
        layers = {}
        for lyr, name in zip(c.target_layers, c.layer_names):
            hid = np.zeros((qc, doc.hidden[lyr].shape[1]), doc.hidden[lyr].dtype)
            hid[:b - a] = doc.hidden[lyr][doc.hidden_rows[a:b]]
            s = _multi_query_scores(params[name], c, jnp.asarray(hid), pos, keys[lyr], lens, impl=impl)
            layers[name] = np.asarray(s)[:b - a, :n]
        ens = np.asarray(mi.ensemble_scores([layers[nm] for nm in c.layer_names], mode=c.ensemble))
        yield a, ens, layers


def score_document(params, indexer_config: mi.IndexerConfig, doc: D.Doc, *, impl: str = "auto",
                   per_layer: bool = False):
    """Ensemble sigmoid scores float32 [Q, N] of every query of ``doc`` (columns >= n_candidates[q] are
    0). With ``per_layer`` also returns {"l{ID}": [Q, N]}. (Use ``iter_document_scores`` for long
    documents.)"""
    q_total, n = len(doc.positions), doc.n_entries
    ens = np.zeros((q_total, n), np.float32)
    layers = {name: np.zeros((q_total, n), np.float32) for name in indexer_config.layer_names}
    for q0, e, lay in iter_document_scores(params, indexer_config, doc, impl=impl):
        ens[q0:q0 + len(e)] = e
        for name, v in lay.items():
            layers[name][q0:q0 + len(e)] = v
    return (ens, layers) if per_layer else ens


# ---------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------
def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney ROC AUC with tied scores counted one half. NaN when a class is empty."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inv, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    rank_sum = float(avg_rank[inv][labels].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _auc_bins(scores: np.ndarray) -> np.ndarray:
    """Histogram bin of each score in [0, 1]: the top bits of its float32 pattern (monotone in the value,
    relative bin width 2^-9)."""
    bits = np.clip(scores, 0.0, 1.0).astype(np.float32).view(np.uint32)
    return (bits >> 14).astype(np.int64)


_AUC_NBINS = (int(np.float32(1.0).view(np.uint32)) >> 14) + 1


class MetricAccumulator:
    """Accumulates score matrices (per document, in chunks of queries) into the metrics of the module
    docstring. ROC AUC is exact while at most ``max_auc_pairs`` pairs were seen, else from a fine
    histogram of the scores (error ~1e-3)."""

    def __init__(self, threshold: float = 0.5, keep_grid=KEEP_GRID, max_auc_pairs: int = 4_000_000):
        self.threshold = float(threshold)
        self.grid = np.asarray(keep_grid, np.float64)
        self.max_auc_pairs = max_auc_pairs
        self.tp = self.kept = self.pos = self.cand = 0
        self.rand_same = self.rec_same = 0.0
        self.curve_idx = np.zeros(len(self.grid))
        self.curve_rec = np.zeros(len(self.grid))
        self.curve_rand = np.zeros(len(self.grid))
        self.n_queries = 0
        self.q_recall_sum, self.q_with_pos, self.q_keep_sum, self.q_with_cand = 0.0, 0, 0.0, 0
        self._auc_s, self._auc_y, self._n_pairs = [], [], 0
        self._hist_pos = np.zeros(_AUC_NBINS, np.int64)
        self._hist_neg = np.zeros(_AUC_NBINS, np.int64)

    def add(self, scores: np.ndarray, doc: D.Doc, q0: int = 0) -> None:
        """``scores`` [qn, N]: rows are ``doc``'s queries ``q0 .. q0 + qn - 1``."""
        qn, n = scores.shape
        if qn == 0 or n == 0:
            return
        ncand = doc.n_candidates[q0:q0 + qn].astype(np.int64)
        ptr = doc.labels.pointers[q0:q0 + qn + 1]
        pidx = doc.labels.indices[ptr[0]:ptr[-1]].astype(np.int64)
        prow = np.repeat(np.arange(qn), np.diff(ptr))
        cand = np.arange(n)[None, :] < ncand[:, None]
        y = np.zeros((qn, n), bool)
        y[prow, pidx] = True
        npos = np.diff(ptr)
        kept = (scores >= self.threshold) & cand
        kq = kept.sum(1)
        self.tp += int(kept[prow, pidx].sum())
        self.kept += int(kq.sum())
        self.pos += len(pidx)
        self.cand += int(ncand.sum())
        self.n_queries += qn
        safe_n = np.maximum(ncand, 1)
        tp_q = np.bincount(prow, weights=kept[prow, pidx], minlength=qn)
        has_pos = npos > 0
        self.q_recall_sum += float((tp_q[has_pos] / npos[has_pos]).sum())
        self.q_with_pos += int(has_pos.sum())
        self.q_keep_sum += float((kq / safe_n)[ncand > 0].sum())
        self.q_with_cand += int((ncand > 0).sum())
        self.rand_same += float((npos * kq / safe_n).sum())
        # rank of every positive (1 = first kept) by recency and by score (stable: ties -> newer entry)
        rec_rank = ncand[prow] - pidx
        masked = np.where(cand, scores.astype(np.float64), -np.inf)
        order = n - 1 - np.argsort(-masked[:, ::-1], axis=1, kind="stable")
        inv = np.empty_like(order)
        np.put_along_axis(inv, order, np.broadcast_to(np.arange(n), (qn, n)), axis=1)
        score_rank = inv[prow, pidx] + 1
        self.rec_same += float((rec_rank <= kq[prow]).sum())
        for gi, rho in enumerate(self.grid):
            k = np.minimum(ncand, np.ceil(rho * ncand - 1e-9).astype(np.int64))
            self.curve_idx[gi] += float((score_rank <= k[prow]).sum())
            self.curve_rec[gi] += float((rec_rank <= k[prow]).sum())
            self.curve_rand[gi] += float((npos * k / safe_n).sum())
        s_c, y_c = scores[cand], y[cand]
        bins = _auc_bins(s_c)
        self._hist_pos += np.bincount(bins[y_c], minlength=_AUC_NBINS)
        self._hist_neg += np.bincount(bins[~y_c], minlength=_AUC_NBINS)
        self._n_pairs += len(s_c)
        if self._n_pairs <= self.max_auc_pairs:
            self._auc_s.append(s_c.astype(np.float32))
            self._auc_y.append(y_c)
        else:
            self._auc_s, self._auc_y = [], []

    def auc(self) -> float:
        if self._n_pairs <= self.max_auc_pairs:
            s = np.concatenate(self._auc_s) if self._auc_s else np.zeros(0, np.float32)
            y = np.concatenate(self._auc_y) if self._auc_y else np.zeros(0, bool)
            return roc_auc(s, y)
        p, q = self._hist_pos.astype(np.float64), self._hist_neg.astype(np.float64)
        if p.sum() == 0 or q.sum() == 0:
            return float("nan")
        below = np.cumsum(q) - q
        return float((p * below + 0.5 * p * q).sum() / (p.sum() * q.sum()))

    def result(self) -> dict:
        def div(a, b):
            return float(a / b) if b else float("nan")

        return {
            "threshold": self.threshold,
            "recall": div(self.tp, self.pos),
            "precision": div(self.tp, self.kept),
            "keep_ratio": div(self.kept, self.cand),
            "query_recall": div(self.q_recall_sum, self.q_with_pos),
            "query_keep_ratio": div(self.q_keep_sum, self.q_with_cand),
            "auc": self.auc(),
            "baselines_at_same_keep": {"random": div(self.rand_same, self.pos),
                                       "recency": div(self.rec_same, self.pos)},
            "curve": {"keep_ratio": self.grid.tolist(),
                      "indexer": [div(v, self.pos) for v in self.curve_idx],
                      "recency": [div(v, self.pos) for v in self.curve_rec],
                      "random": [div(v, self.pos) for v in self.curve_rand]},
            "counts": {"queries": self.n_queries, "candidates": self.cand, "positives": self.pos,
                       "kept": self.kept, "true_positives": self.tp,
                       "positive_rate": div(self.pos, self.cand)},
        }


def _runs(mask: np.ndarray):
    """(start, stop) of each run of True in a bool [n] mask."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return zip(edges[::2], edges[1::2])


def evaluate_dataset(params, indexer_config: mi.IndexerConfig, dataset: D.IndexerDataset, *,
                     threshold: float | None = None, impl: str = "auto", progress: bool = False,
                     per_layer: bool = True, min_candidates: int = 0) -> dict:
    """Metrics of ``params`` on every query of ``dataset`` (see the module docstring) that sees at least
    ``min_candidates`` entries (e.g. 256: leave out the queries at a document's first 1K tokens, whose
    dense labels dominate the pooled figures)."""
    c = indexer_config
    thr = c.threshold if threshold is None else threshold
    acc = MetricAccumulator(thr)
    layer_acc = {name: MetricAccumulator(thr, keep_grid=()) for name in c.layer_names} if per_layer else {}
    it = range(dataset.n_docs)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="evaluate", unit="doc")
    for di in it:
        doc = dataset.doc(di)
        use = doc.n_candidates >= min_candidates
        for q0, ens, by_layer in iter_document_scores(params, c, doc, impl=impl):
            for a, b in _runs(use[q0:q0 + ens.shape[0]]):
                acc.add(ens[a:b], doc, q0 + a)
                for name, la in layer_acc.items():
                    la.add(by_layer[name][a:b], doc, q0 + a)
    out = acc.result()
    if layer_acc:
        out["per_layer"] = {name: {k: a.result()[k] for k in METRICS}
                            for name, a in layer_acc.items()}
    out["ensemble"] = c.ensemble
    out["docs"] = dataset.n_docs
    out["min_candidates"] = min_candidates
    return out


# ---------------------------------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------------------------------
def _require_matplotlib():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the recall-vs-keep-ratio plot needs matplotlib, which is not installed: "
                          "`pip install matplotlib` (the `plot` extra of fm_jax) or pass --no-plot") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curve(result: dict, path: str, title: str = "Memory Indexer") -> str:
    plt = _require_matplotlib()
    cur = result["curve"]
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    ax.plot(cur["keep_ratio"], cur["indexer"], "o-", label="trained indexer")
    ax.plot(cur["keep_ratio"], cur["recency"], "s--", label="recency")
    ax.plot(cur["keep_ratio"], cur["random"], ":", label="random (expected)")
    ax.plot([result["keep_ratio"]], [result["recall"]], "r*", ms=12,
            label=f"threshold {result['threshold']:g}: recall {result['recall']:.3f}")
    ax.set_xlabel("keep ratio (fraction of candidate entries kept)")
    ax.set_ylabel("recall of golden entries")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"{title}  (AUC {result['auc']:.3f})")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------
def load_indexer(ckpt: str, **overrides) -> tuple[mi.IndexerConfig, dict, str]:
    """``ckpt``: a FlashMemory ``.safetensors`` file, or a ``train.fit`` run directory (its export).
    Returns (config, params, resolved path)."""
    path = ckpt
    if os.path.isdir(ckpt):
        path = os.path.join(ckpt, "export", "indexer.safetensors")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{ckpt} is a directory without export/indexer.safetensors "
                                    "(has train.fit finished?)")
    c, params = interop.load_flashmemory_checkpoint(path, **overrides)
    return c, params, path


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=cli.existing_dir, required=True, help="train.dump output directory")
    p.add_argument("--ckpt", type=cli.existing_path, required=True,
                   help="FlashMemory .safetensors (e.g. DATA/li_init.safetensors) or a train.fit run directory")
    p.add_argument("--out", required=True, help="directory for eval.json and recall_vs_keep.png")
    p.add_argument("--docs", default="auto", choices=("auto", "val", "all"),
                   help="auto = the run's validation split when --ckpt is a run dir with split.json, else all")
    p.add_argument("--threshold", type=cli.unit_float, default=None, help="keep threshold (default: the checkpoint's)")
    p.add_argument("--min-candidates", type=cli.int_range(0), default=0,
                   help="evaluate only the queries that see at least this many entries")
    p.add_argument("--impl", default="auto", choices=("auto", "xla", "pallas"))
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    c, params, path = load_indexer(args.ckpt)
    doc_ids = None
    split_path = os.path.join(args.ckpt, "split.json") if os.path.isdir(args.ckpt) else None
    if args.docs in ("auto", "val") and split_path and os.path.exists(split_path):
        with open(split_path) as f:
            doc_ids = json.load(f)["val"] or None
        if doc_ids is None and args.docs == "val":
            raise SystemExit(f"{split_path} has no validation documents")
    elif args.docs == "val":
        raise SystemExit("--docs val needs --ckpt to be a train.fit run directory with split.json")
    ds = D.IndexerDataset(args.data, doc_ids)
    missing = [lyr for lyr in c.target_layers if lyr not in ds.target_layers]
    if missing:
        raise SystemExit(f"checkpoint scores layers {missing} that the dump in {args.data} does not hold "
                         f"(dump layers {list(ds.target_layers)})")
    res = evaluate_dataset(params, c, ds, threshold=args.threshold, impl=args.impl, progress=not args.no_progress,
                           min_candidates=args.min_candidates)
    res["checkpoint"] = os.path.abspath(path)
    res["data"] = os.path.abspath(args.data)
    os.makedirs(args.out, exist_ok=True)
    D.atomic_write_json(os.path.join(args.out, "eval.json"), res)
    if not args.no_plot:
        res["plot"] = plot_curve(res, os.path.join(args.out, "recall_vs_keep.png"))
    summary = {k: res[k] for k in METRICS}
    summary["random_at_same_keep"] = res["baselines_at_same_keep"]["random"]
    summary["recency_at_same_keep"] = res["baselines_at_same_keep"]["recency"]
    print(json.dumps(summary), file=sys.stderr)
    return res


if __name__ == "__main__":
    sys.exit(cli.run(main))
