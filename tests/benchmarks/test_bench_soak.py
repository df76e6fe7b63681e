"""The soak at CI size (issue 14 item 3): 2K decode steps in full, keep-all LSA and small-budget LSA;
no compilation after the first cycle, flat host RSS and device bytes, keep-all LSA bit-identical to
full to the end. `python -m benchmarks.bench_soak` runs the 100K-token version."""
from benchmarks import bench_soak


def test_soak_2k_steps():
    res = bench_soak.run(2048, prompt_len=256, tau=64, sample_every=512, kmax_pages=6)
    for name in bench_soak.RUNS:
        r = res[name]
        assert r["decoded_steps"] >= 2048
        assert len(r["samples"]) >= 3
        assert r["compiles_after_first_cycle"] == 0, (name, r["samples"])
        assert r["window_jit_cache_growth"] == 0
        assert r["host_rss_growth"] < 0.05, (name, r["samples"])
        assert r["device_bytes_growth"] < 0.05, (name, r["samples"])
    assert res["lsa_keep_all"]["bit_identical_to_full"]
    assert res["lsa_budget"]["recalled_bytes"] > 0 and res["lsa_budget"]["resident_fraction"] < 0.5
