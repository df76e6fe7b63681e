"""V4's fp8 KV entries (issue 15): the forward's rounding against an independent NumPy version of the
reference's `act_quant` (block 64, ue8m0 scale 2^ceil(log2(max(amax, 1e-4) / 448)), e4m3 round to nearest
even), the packed byte layout, and unpack(pack(kv)) == round_kv(kv) bit for bit on random and extreme values."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fm_jax import get_config
from fm_jax.layers import kv_fp8

D, R = 512, 64          # V4-Flash: 448 nope dims in 7 blocks + 64 rope dims -> 584 bytes


def numpy_round(kv: np.ndarray, rope_dim: int) -> np.ndarray:
    """The reference's in-place fake quantisation, written independently (float32 math, float64 log2)."""
    x = np.asarray(kv, np.float32)
    nope = x.shape[-1] - rope_dim
    blocks = x[..., :nope].reshape(*x.shape[:-1], nope // 64, 64)
    amax = np.maximum(np.abs(blocks).max(-1), np.float32(1e-4))
    scale = np.exp2(np.ceil(np.log2((amax * np.float32(1 / 448)).astype(np.float64)))).astype(np.float32)
    q = np.clip(blocks / scale[..., None], -448, 448).astype(ml_dtypes.float8_e4m3fn)
    nope_vals = (q.astype(np.float32) * scale[..., None]).reshape(*x.shape[:-1], nope)
    rope = x[..., nope:].astype(ml_dtypes.bfloat16).astype(np.float32)
    return np.concatenate([nope_vals, rope], axis=-1)


def extreme_rows(rng) -> np.ndarray:
    """[8, D] float32 rows: per-block scales from 2^-20 to 2^20, exact +-448 * scale, zero blocks, blocks
    below the 1e-4 amax floor, e4m3 subnormals (|x / scale| < 2^-6), ties between e4m3 neighbours."""
    rows = rng.normal(size=(8, D)).astype(np.float32)
    blocks = rows[:, :D - R].reshape(8, -1, 64)
    blocks *= np.exp2(rng.integers(-20, 21, size=(8, blocks.shape[1], 1))).astype(np.float32)
    blocks[0, 0] = 0.0                                              # zero block: scale from the 1e-4 floor
    blocks[0, 1] = 3e-6 * rng.normal(size=64)                       # below the floor
    blocks[1, :, 0] = 448.0 * 2.0 ** 3                              # exactly +-448 * scale
    blocks[1, :, 1] = -448.0 * 2.0 ** 3
    blocks[2, 2] = 2.0 * 2.0 ** -9 * 0.37 * np.arange(64)           # x / scale: e4m3 subnormals (< 2^-6) ...
    blocks[2, 2, 0] = 448.0 * 2.0                                   # ... with the block's scale fixed at 2
    blocks[3, 3] = (1 + 2.0 ** -4) * np.sign(rng.normal(size=64))   # halfway between e4m3 values
    blocks[3, 3, 0] = 448.0
    rows[:, :D - R] = blocks.reshape(8, -1)
    rows[4, D - R:] = 1 + 2.0 ** -9                                 # rope dims that round in bf16
    return rows


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_matches_the_reference_formula_and_pack_is_lossless(dtype):
    rng = np.random.default_rng(0)
    kv = jnp.asarray(np.concatenate([extreme_rows(rng), 30 * rng.normal(size=(6, D)).astype(np.float32)]), dtype)
    rounded = jax.jit(kv_fp8.round_kv, static_argnums=1)(kv, R)
    assert rounded.dtype == dtype
    np.testing.assert_array_equal(np.asarray(rounded, np.float32), numpy_round(np.asarray(kv, np.float32), R))
    packed = jax.jit(kv_fp8.pack, static_argnums=1)(kv, R)
    assert packed.shape == (14, 584) and packed.dtype == jnp.uint8
    back = kv_fp8.unpack(packed, D, R, dtype)
    # bit for bit (also the sign of zero)
    as_bits = lambda x: np.asarray(x).view(np.uint32 if dtype == jnp.float32 else np.uint16)
    np.testing.assert_array_equal(as_bits(back), as_bits(rounded))
    assert np.all(np.abs(np.asarray(kv, np.float32)[1, :D - R].reshape(-1, 64)[:, :2]) == 448 * 8)


def test_byte_layout():
    rng = np.random.default_rng(1)
    kv = rng.normal(size=(3, D)).astype(np.float32)
    kv[:, :64] *= 1000.0                                   # block 0: amax ~ 3000 -> scale 2^3 (+ 127)
    p = np.asarray(kv_fp8.pack(jnp.asarray(kv), R))
    ref = numpy_round(kv, R)
    amax = np.abs(kv[:, :D - R].reshape(3, 7, 64)).max(-1)
    exp = np.ceil(np.log2(amax.astype(np.float64) * np.float32(1 / 448))).astype(int)
    np.testing.assert_array_equal(p[:, 576:583], exp + 127)                  # ue8m0 bytes
    np.testing.assert_array_equal(p[:, 583], 0)                              # pad
    fp8 = p[:, :448].view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(fp8.reshape(3, 7, 64) * np.exp2(exp)[..., None], ref[:, :448].reshape(3, 7, 64))
    rope = p[:, 448:576].copy().view("<u2").view(ml_dtypes.bfloat16)         # little-endian bf16
    np.testing.assert_array_equal(rope.astype(np.float32), ref[:, 448:])
    # an empty cache slot (all zero bytes) is a zero entry
    np.testing.assert_array_equal(np.asarray(kv_fp8.unpack(jnp.zeros((2, 584), jnp.uint8), D, R)), 0.0)


def test_page_blocks_give_the_release_page_order_and_invert():
    rng = np.random.default_rng(2)
    packed = kv_fp8.pack(jnp.asarray(rng.normal(size=(2, 8, D)), jnp.float32), R)     # 2 pages of 4
    blocks = kv_fp8.to_page_blocks(packed, D, R, 4)
    assert blocks.shape == (2, 2, 4 * 584)
    p = np.asarray(packed)
    np.testing.assert_array_equal(np.asarray(blocks)[1, 1, :4 * 576], p[1, 4:8, :576].reshape(-1))  # data rows
    np.testing.assert_array_equal(np.asarray(blocks)[1, 1, 4 * 576:], p[1, 4:8, 576:].reshape(-1))  # scale rows
    np.testing.assert_array_equal(np.asarray(kv_fp8.from_page_blocks(blocks, D, R, 4)), p)
    with pytest.raises(ValueError, match="multiple of 3"):
        kv_fp8.to_page_blocks(packed, D, R, 3)


@pytest.mark.parametrize("head_dim,rope_dim,expect",
                         [(512, 64, 584), (72, 8, 88), (144, 16, 168), (576, 64, 648), (1088, 64, 1168)])
def test_entry_bytes_generalise(head_dim, rope_dim, expect):
    assert kv_fp8.entry_bytes(head_dim, rope_dim) == expect
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, head_dim)), jnp.float32)
    back, rounded = jax.jit(lambda x: (kv_fp8.unpack(kv_fp8.pack(x, rope_dim), head_dim, rope_dim),
                                       kv_fp8.round_kv(x, rope_dim)))(x)
    np.testing.assert_array_equal(np.asarray(back), np.asarray(rounded))
    np.testing.assert_array_equal(np.asarray(rounded), numpy_round(np.asarray(x), rope_dim))


def test_bad_layouts_and_config():
    for d, r in ((100, 4), (64, 64), (128, 0)):
        with pytest.raises(ValueError, match="multiple of 64"):
            kv_fp8.entry_bytes(d, r)
    with pytest.raises(ValueError, match="uint8"):
        kv_fp8.unpack(jnp.zeros((2, 583), jnp.uint8), D, R)
    with pytest.raises(ValueError, match="uint8"):
        kv_fp8.unpack(jnp.zeros((2, 584), jnp.int8), D, R)
    assert get_config("v4_flash").kv_fp8 and get_config("v4_flash").kv_entry_bytes == 584
    for name in ("tiny", "small", "mini"):
        assert not get_config(name).kv_fp8
    assert get_config("tiny").kv_entry_bytes == 32 * 4
    assert get_config("v4_flash", kv_fp8=False).kv_entry_bytes == 1024
    assert get_config("small", kv_fp8=True, head_dim=160).kv_entry_bytes == 128 + 64 + 8   # rope_dim 32
    with pytest.raises(ValueError, match="kv_fp8"):
        get_config("tiny", kv_fp8=True)                    # 32 - 8 = 24 nope dims
    with pytest.raises(ValueError, match="kv_fp8"):
        get_config("tiny", kv_fp8=1, head_dim=72)
