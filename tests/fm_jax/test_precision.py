"""Matmul precision (issue 11): in a float32 config every matmul of prefill and decode runs at HIGHEST
(IEEE float32; XLA:GPU would otherwise run the unnamed ones as TF32), `matmul_precision` overrides it,
and a bfloat16 config keeps XLA's default. Checked on the traced program, so it holds on any backend."""
import jax
import jax.numpy as jnp
import pytest
from jax.lax import Precision

from fm_jax import backbone, get_config
from fm_jax.cache import init_cache
from tests.fm_jax.helpers import abstract_params

V4_FEATURES = {"ffn": "moe", "hc_mult": 4, "n_hash_layers": 1}  # experts, shared expert, mHC mixers


def dot_precisions(jaxpr) -> list:
    """The `precision` of every dot_general in `jaxpr` and the jaxprs nested in it (scan, pjit, ...)."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(eqn.params["precision"])
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if hasattr(sub, "eqns"):
                    out += dot_precisions(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    out += dot_precisions(sub.jaxpr)
    return out


def traced_precisions(c) -> list:
    params = abstract_params(c)
    tokens = jnp.zeros((2, 16), jnp.int32)
    seq = jax.make_jaxpr(lambda p, t: backbone.run_sequence(p, c, t, impl="xla")[0])(params, tokens)
    cache = init_cache(c, 2, 32)
    step = jax.make_jaxpr(lambda p, k, t: backbone.run_step(p, c, k, t, impl="xla")[0])(params, cache, tokens[:, 0])
    return dot_precisions(seq.jaxpr) + dot_precisions(step.jaxpr)


def test_float32_config_means_float32_matmuls():
    c = get_config("tiny", **V4_FEATURES)
    assert c.dtype == "float32" and c.matmul_precision is None and c.dot_precision == "highest"
    precs = traced_precisions(c)
    assert len(precs) > 20
    assert set(precs) == {(Precision.HIGHEST, Precision.HIGHEST)}


def test_matmul_precision_overrides_and_bfloat16_keeps_the_default():
    tf32 = traced_precisions(get_config("tiny", matmul_precision="tensorfloat32", **V4_FEATURES))
    named = (Precision.HIGHEST, Precision.HIGHEST)  # mHC mixers and the router name theirs
    assert (Precision.HIGH, Precision.HIGH) in tf32 and set(tf32) <= {(Precision.HIGH, Precision.HIGH), named}
    bf16 = traced_precisions(get_config("tiny", dtype="bfloat16", **V4_FEATURES))
    assert None in bf16 and set(bf16) <= {None, named}


def test_bad_matmul_precision_is_rejected():
    with pytest.raises(ValueError, match="matmul_precision"):
        get_config("tiny", matmul_precision="fp32")
