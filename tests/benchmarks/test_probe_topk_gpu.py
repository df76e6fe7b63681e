"""benchmarks/probe_topk_gpu.py in interpret mode: the kernel is exact there, so the probe reports full overlap."""
from benchmarks.probe_topk_gpu import main


def test_probe_reports_exact_interpret_kernel(tmp_path):
    out = main(["--interpret", "--quick", "--out", str(tmp_path / "p.json")])
    assert {"device", "jax", "date", "command", "rows"} <= out.keys()
    for row in out["rows"]:
        assert row["same_order"] and row["in_reference_set"] == [row["topk"]] * row["batch"]
        assert row["smallest_picked"] == row["kth_reference"]
