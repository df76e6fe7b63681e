"""benchmarks/bench_serving.py: the batch plan follows the engine's byte accounting, and a --smoke run
decodes both modes end to end on CPU from the serving caches (LSA's built straight into the host mirror)."""
import json

import numpy as np

from benchmarks.bench_serving import main, plan, serving_config
from serve.engine import kv_bytes


def test_plan_is_the_engine_accounting():
    c = serving_config(smoke=True)
    n = np.asarray([4096 + 129])
    full, tiered = kv_bytes(c, n)["full"][0], kv_bytes(c, n, reserve_cells=6 * c.page_entries, target_layers=(3,))
    row = plan(c, 4096, 129, 6, (3,), device_budget=10 * full + 1, host_budget=3 * tiered["csa_full"][0], tau=64)
    assert row["full_batch"] == 10 and row["lsa_host_bytes_per_request"] == tiered["csa_full"][0]
    assert row["lsa_batch_device_bound"] == (10 * full + 1) // tiered["device"][0] > 10
    assert (row["lsa_batch"], row["lsa_bound"]) == (3, "host") and row["concurrency_ratio"] == 0.3


def test_smoke_run_decodes_both_modes(tmp_path):
    out = tmp_path / "serving.json"
    main(["--smoke", "--out", str(out), "--contexts", "1024", "--windows", "3", "--tau", "16",
          "--device-budget-gb", "0.001", "--host-budget-gb", "0.0012"])
    payload = json.loads(out.read_text())
    assert {"device", "jax", "date", "command", "model", "rows"} <= payload.keys()
    (row,) = payload["rows"]
    assert row["full"]["batch"] == row["full_batch"] >= 1
    assert row["lsa"]["batch"] == row["lsa_batch"] > row["full_batch"]
    assert row["lsa"]["device_kv_bytes"] <= 1e6 and row["full"]["device_kv_bytes"] <= 1e6
    assert row["lsa"]["recall_landed_s_per_cycle"] > 0 and row["throughput_ratio"] > 0


def test_plan_only_by_kv_dtype(tmp_path):
    """--plan-only allocates no weights and decodes nothing; fp8 entries fit more requests than bf16 ones."""
    rows = {}
    for kvd in ("fp8", "bf16"):
        out = tmp_path / f"{kvd}.json"
        main(["--smoke", "--plan-only", "--kv-dtype", kvd, "--out", str(out), "--contexts", "4096",
              "--device-budget-gb", "0.01", "--host-budget-gb", "0.01"])
        payload = json.loads(out.read_text())
        assert payload["model"]["kv_fp8"] == (kvd == "fp8")
        (rows[kvd],) = payload["rows"]
        assert "full" not in rows[kvd] and "lsa" not in rows[kvd]
    assert rows["fp8"]["full_device_bytes_per_request"] < rows["bf16"]["full_device_bytes_per_request"]
    assert rows["fp8"]["full_batch"] > rows["bf16"]["full_batch"] >= 1
    assert rows["fp8"]["lsa_batch"] > rows["bf16"]["lsa_batch"]
