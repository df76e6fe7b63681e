"""benchmarks/bench_moe.py: the --smoke run works end to end on CPU (dense and sparse rows timed and
agreeing, GPU-only variants recorded as errors) and the FLOP count follows its definition."""
import json

import pytest

from benchmarks.bench_moe import expert_flops, main, moe_config


def test_smoke_run_writes_rows(tmp_path):
    out = tmp_path / "moe.json"
    assert main(["--smoke", "--decode-tokens", "3", "--impls", "dense,sparse,sparse_mgpu", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert {"device", "jax", "date", "command", "layer", "rows"} <= payload.keys()
    rows = payload["rows"]
    assert [(r["phase"], r["tokens"], r["impl"]) for r in rows] == [
        ("decode", 3, "dense"), ("decode", 3, "sparse"), ("decode", 3, "sparse_mgpu"),
        ("prefill", 64, "dense"), ("prefill", 64, "sparse"), ("prefill", 64, "sparse_mgpu")]
    for r in rows:
        if r["impl"] == "sparse_mgpu":
            assert "GPU" in r["error"]  # CPU: recorded, not raised
            continue
        assert "error" not in r, r.get("error")
        assert r["ms"] > 0 and r["speedup_vs_dense"] > 0
        if r["impl"] == "sparse":  # bf16: the two round the sum over experts differently
            assert r["max_abs_diff_vs_dense"] <= 2 ** -6 * r["max_abs_dense"]


def test_expert_flops_and_unknown_impl(tmp_path):
    c = moe_config(smoke=True)
    pair = 2.0 * 3 * c.d_model * c.moe_inter_dim
    assert expert_flops(c, 10, "dense") == pair * 10 * c.n_routed_experts
    assert expert_flops(c, 10, "sparse") == pair * 10 * c.moe_top_k
    with pytest.raises(SystemExit, match="unknown impl"):
        main(["--smoke", "--impls", "dense,gather", "--out", str(tmp_path / "x.json")])
