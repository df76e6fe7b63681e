"""benchmarks/bench_prefill.py: the --smoke run works end to end (one subprocess per mode) and the FLOP
count follows its definition."""
import json

import numpy as np

from benchmarks.bench_prefill import main, model_flops
from fm_jax.config import get_config


def test_smoke_run_writes_rows(tmp_path):
    out = tmp_path / "prefill.json"
    assert main(["--smoke", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert {"device", "jax", "date", "command", "chunk"} <= payload.keys()
    rows = payload["rows"]
    assert [r["mode"] for r in rows] == ["full", "lsa"]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["context"] == 100 and r["n_chunks"] == 4 and r["steady_tokens_per_s"] > 0
        assert r["model_flops"]["total"] > 0 and "peak_bytes_in_use" in r["memory_after_prefill"]
    lsa = rows[1]
    assert lsa["host_mirror_bytes"] > 0 and lsa["d2h_bytes"] > 0 and lsa["h2d_bytes"] > 0


def test_model_flops_counts_visible_entries():
    c = get_config("tiny")
    t = 100
    fl = model_flops(c, t)
    vis = (np.arange(t) + 1) // c.csa_ratio
    n_csa = len(c.csa_layers)
    assert fl["indexer"] == n_csa * 2.0 * c.n_index_heads * c.index_head_dim * vis.sum()
    keys_window = np.minimum(np.arange(t) + 1, c.window).sum()
    hca_vis = ((np.arange(t) + 1) // c.hca_ratio).sum()
    keys = c.n_layers * keys_window + n_csa * np.minimum(vis, c.index_topk).sum() + hca_vis
    assert fl["attention"] == 4.0 * c.n_heads * c.head_dim * keys
    assert fl["total"] == fl["projections"] + fl["attention"] + fl["indexer"] + fl["ffn"]
