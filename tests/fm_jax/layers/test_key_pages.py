"""Page-blocked index keys (issue 12): the byte layout against a NumPy model, round trips on random bytes,
16-byte alignment, the write helpers, and dequantisation equal to the row layout's bit for bit."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_jax.layers import key_pages as kp
from fm_jax.layers.quant import dequantize_index_keys, pack_index_keys, unpack_index_keys


def np_block(rows: np.ndarray, p: int) -> np.ndarray:
    """The layout written out: per page, P * D fp8 bytes, then P * 4 scale bytes."""
    *lead, n, e = rows.shape
    d = e - 4
    n_pages = -(-n // p)
    out = np.zeros((*lead, n_pages, p * e), np.uint8)
    for i in range(n):
        pg, o = divmod(i, p)
        out[..., pg, o * d:(o + 1) * d] = rows[..., i, :d]
        out[..., pg, p * d + 4 * o:p * d + 4 * o + 4] = rows[..., i, d:]
    return out


@pytest.mark.parametrize("p", [1, 3, 4, 8, 16])
@pytest.mark.parametrize("n", [1, 8, 13, 32])
def test_block_matches_numpy_model_and_round_trips(p, n):
    rng = np.random.default_rng(n * 31 + p)
    d = 16
    rows = rng.integers(0, 256, (2, n, d + 4), dtype=np.uint8)
    got = np.asarray(kp.block_index_keys(jnp.asarray(rows), p))
    np.testing.assert_array_equal(got, np_block(rows, p))
    assert got.shape == (2, -(-n // p), p * (d + 4))
    back = np.asarray(kp.unblock_index_keys(jnp.asarray(got), p, d))
    np.testing.assert_array_equal(back[:, :n], rows)
    assert not back[:, n:].any()   # padding rows are empty keys


@pytest.mark.parametrize("p", [4, 8, 16, 64])
def test_rows_start_16_byte_aligned_when_page_entries_divisible_by_4(p):
    # tag every byte of row i with i: the offset of each row's first byte within its page is then visible
    d, n = 128, 2 * p
    rows = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None], (n, d + 4)).copy()
    pages = np.asarray(kp.block_index_keys(jnp.asarray(rows), p))
    for i in range(n):
        pg, o = divmod(i, p)
        fp8_off, scale_off = o * d, p * d + 4 * o
        assert (pages[pg, fp8_off:fp8_off + d] == i).all() and (pages[pg, scale_off:scale_off + 4] == i).all()
        assert fp8_off % 16 == 0
    assert (p * d) % 16 == 0 and (p * 4) % 16 == 0      # the scale region and the next page start aligned
    assert kp.index_page_bytes(p, d) % 16 == 0


def test_split_and_dequantize_equal_the_row_layout_bit_for_bit():
    k = jax.random.normal(jax.random.PRNGKey(0), (3, 24, 32)) * 3.0
    rows = pack_index_keys(k)
    pages = kp.block_index_keys(rows, 8)
    q, s = kp.split_index_pages(pages, 8, 32)
    q0, s0 = unpack_index_keys(rows)
    np.testing.assert_array_equal(np.asarray(q, np.float32), np.asarray(q0, np.float32))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s0))
    np.testing.assert_array_equal(np.asarray(kp.dequantize_index_pages(pages, 8, 32)),
                                  np.asarray(dequantize_index_keys(rows)))


@pytest.mark.parametrize("p", [4, 8])
def test_write_index_keys_matches_numpy_model(p):
    rng = np.random.default_rng(p)
    b, n_pages, d = 3, 3, 16
    base = rng.integers(0, 256, (b, n_pages * p, d + 4), dtype=np.uint8)
    pages = kp.block_index_keys(jnp.asarray(base), p)
    write = jax.jit(kp.write_index_keys, static_argnums=3)
    for step in range(6):
        new = rng.integers(0, 256, (b, d + 4), dtype=np.uint8)
        ent = rng.integers(0, n_pages * p + 2, (b,))           # some past the buffer: dropped
        mask = rng.random(b) < 0.7
        pages = write(pages, jnp.asarray(ent), jnp.asarray(new), p, jnp.asarray(mask))
        for i in range(b):
            if mask[i] and ent[i] < n_pages * p:
                base[i, ent[i]] = new[i]
        np.testing.assert_array_equal(np.asarray(pages), np_block(base, p), err_msg=f"step {step}")
    ent = jnp.asarray([0, p + 1, 2 * p - 1])
    new = rng.integers(0, 256, (b, d + 4), dtype=np.uint8)
    base[np.arange(b), np.asarray(ent)] = new
    np.testing.assert_array_equal(np.asarray(kp.write_index_keys(pages, ent, jnp.asarray(new), p)), np_block(base, p))


def test_write_index_pages_writes_whole_pages():
    rng = np.random.default_rng(1)
    p, d = 4, 8
    base = rng.integers(0, 256, (2, 16, d + 4), dtype=np.uint8)
    new = rng.integers(0, 256, (2, 8, d + 4), dtype=np.uint8)
    got = jax.jit(kp.write_index_pages, static_argnums=3)(kp.block_index_keys(jnp.asarray(base), p),
                                                          jnp.asarray(new), jnp.asarray(4), p)
    base[:, 4:12] = new
    np.testing.assert_array_equal(np.asarray(got), np_block(base, p))
    with pytest.raises(ValueError, match="whole pages"):
        kp.write_index_pages(got, jnp.asarray(new[:, :6]), 4, p)


def test_clear_errors():
    rows = jnp.zeros((2, 8, 20), jnp.uint8)
    with pytest.raises(ValueError, match="uint8"):
        kp.block_index_keys(rows.astype(jnp.float32), 4)
    with pytest.raises(ValueError, match="page_entries"):
        kp.block_index_keys(rows, 0)
    pages = kp.block_index_keys(rows, 4)
    with pytest.raises(ValueError, match=r"page_entries \* \(D \+ 4\)"):
        kp.split_index_pages(pages, 8, 16)
    with pytest.raises(ValueError, match="rows uint8"):
        kp.write_index_keys(pages, jnp.zeros((3,), jnp.int32), jnp.zeros((3, 20), jnp.uint8), 4)
