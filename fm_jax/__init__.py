"""fm_jax: DeepSeek-V4 backbone with Lookahead Sparse Attention (FlashMemory) in JAX."""
from fm_jax.config import ModelConfig, get_config  # noqa: F401
