"""benchmarks/check_serve_long.py: one serve.generate run recorded with its memory, and a failing run
reported instead of written."""
import json

import pytest

from benchmarks.check_serve_long import main


def test_records_generate_json(tmp_path):
    out = tmp_path / "serve.json"
    args = ["--random-weights", "--preset", "tiny", "--context", "120", "--new-tokens", "4", "--mode", "lsa"]
    assert main(["--out", str(out), "--", *args]) == 0
    payload = json.loads(out.read_text())
    assert {"device", "jax", "date", "command", "memory", "wall_s"} <= payload.keys()
    assert payload["generate_args"] == [*args, "--json"]
    gen = payload["generate"]
    assert gen["mode"] == "lsa" and gen["context"] == 120 and gen["new_tokens"] == 4
    assert 0 < gen["device_csa_fraction"] < 1
    assert set(payload["memory"]) == {"peak_bytes_in_use", "bytes_in_use", "bytes_limit"}


def test_generate_error_is_reported(tmp_path):
    out = tmp_path / "serve.json"
    with pytest.raises(SystemExit, match="past the RoPE table"):  # tiny's table holds 16384 positions
        main(["--out", str(out), "--", "--random-weights", "--preset", "tiny", "--context", "16384"])
    assert not out.exists()
