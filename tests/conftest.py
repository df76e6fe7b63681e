"""Test-session setup: 8 virtual CPU devices (for the (2, 4) sharding tests) and the `gpu` marker skip.

XLA_FLAGS must be set before jax is first imported, so this runs at conftest import time (pytest imports
the rootdir conftest before any test module). Existing flags are kept.
"""
import os

_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_DEVICES_FLAG}=8").strip()

import jax  # after XLA_FLAGS
import pytest


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason=f"needs a GPU (jax backend is {jax.default_backend()!r})")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
