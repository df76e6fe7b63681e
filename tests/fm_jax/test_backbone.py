"""fm_jax.backbone: the uncached attention's query chunking (issue 10: an HCA layer selects every visible
entry, so the chunk shrinks as the selection grows and the working set stays bounded)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_jax import backbone


def test_query_chunk_bounds_query_entry_pairs():
    assert backbone.query_chunk(10_000, 512) == backbone.QUERY_CHUNK          # top-k width: unchanged
    assert backbone.query_chunk(100, 64) == 100                               # short prompt: all at once
    assert backbone.query_chunk(10_000, 8192) == 16                           # HCA at 1M tokens
    assert backbone.query_chunk(10_000, 10 ** 7) == 1
    for n in (1, 300, 513, 2048, 8192, 50_000):
        qc = backbone.query_chunk(10_000, n)
        assert qc & (qc - 1) == 0 and (qc == 1 or qc * n <= backbone.QUERY_CHUNK_PAIRS)


@pytest.mark.parametrize("rope_dim", [None, 64])
def test_smaller_query_chunks_give_the_same_attention(monkeypatch, rope_dim):
    # 300 queries over a 1,100-entry selection: 64-query chunks (ragged last chunk) against the 256-query
    # chunks used before; every query's computation is its own, so the results are bit-identical
    rng = np.random.default_rng(0)
    b, t, h, d, n, w = 2, 300, 4, 128, 1100, 8
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    pool = jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32)
    sel = rng.integers(0, n, (b, t, n)).astype(np.int32)
    sel[:, :, -50:] = -1                                                        # padding picks
    window_kv = jnp.asarray(rng.normal(size=(b, t, w, d)), jnp.float32)
    window_len = jnp.asarray(np.minimum(np.arange(t) + 1, w), jnp.int32)
    sink = jnp.asarray(rng.normal(size=(h,)), jnp.float32)
    if rope_dim is not None:  # packed fp8 rows, as the V4 presets store them
        from fm_jax.layers import kv_fp8
        pool, window_kv = kv_fp8.pack(pool, rope_dim), kv_fp8.pack(window_kv, rope_dim)

    def run():
        return jax.jit(lambda *a: backbone._attend_sequence(*a, d ** -0.5, "xla", rope_dim=rope_dim))(
            q, pool, jnp.asarray(sel), window_kv, window_len, sink)

    assert backbone.query_chunk(t, n) == 64
    chunked = np.asarray(run())
    monkeypatch.setattr(backbone, "QUERY_CHUNK_PAIRS", backbone.QUERY_CHUNK * n)  # today's 256-query chunks
    assert backbone.query_chunk(t, n) == 256
    whole = np.asarray(run())
    np.testing.assert_array_equal(chunked, whole)
