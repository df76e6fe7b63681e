"""benchmarks/bench_recall.py: the --smoke run checks every route bit for bit (fp8 bytes and bf16 with
extreme values) and times recall and write-through; a route that cannot run is recorded, not raised."""
import json

import numpy as np

from benchmarks.bench_recall import ROUTES, main, probe, random_rows


def test_smoke_run_times_every_route(tmp_path):
    out = tmp_path / "recall.json"
    assert main(["--smoke", "--reps", "1", "--batches", "2", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert {"device", "jax", "date", "command", "runs"} <= payload.keys()
    assert [(r["kv_dtype"], r["kv_row_dtype"]) for r in payload["runs"]] == [("fp8", "uint8"), ("bf16", "bfloat16")]
    for run in payload["runs"]:
        assert [row["batch"] for row in run["rows"]] == [2]
        for row in run["rows"]:
            routes = row["routes"]
            assert set(ROUTES) | {"ceiling_pinned", "ceiling_pinned_split", "ceiling_numpy"} == routes.keys()
            # on the CPU backend every route runs and recalls the NumPy gather's bytes exactly
            for name in routes:
                assert "error" not in routes[name], (name, routes[name])
                assert routes[name]["recall_s"] > 0 and routes[name]["gbps"] > 0
                for order in ("after", "before"):
                    o = routes[name]["overlap"][order]
                    assert 0 < o["issued_s"] <= o["landed_s"] and o["busy_done_s"] > 0
            assert row["busy_dispatch_s"] < 0.5 * row["busy_alone_s"]  # dispatch returns before the program ends
            # a jitted gather queues behind the device program dispatched before it (one compute stream)
            assert routes["pinned_fori"]["overlap"]["after"]["landed_s"] >= 0.5 * row["busy_alone_s"]
            for name, w in row["write_through"].items():
                assert w["bit_exact"] and w["write_s"] > 0, name
            assert row["write_through"].keys() == set(ROUTES)


def test_random_bf16_rows_are_nan_free_with_extremes():
    x = random_rows(np.random.default_rng(0), (64, 1024), "bfloat16").astype(np.float32)
    assert not np.isnan(x).any() and np.isinf(x).any() and (x == 0).any()


def test_a_route_that_kills_its_probe_is_reported():
    """The child-process probe reports a failing route instead of raising (here: an unknown name)."""
    assert "unknown route 'no_such_route'" in probe(["no_such_route"])
