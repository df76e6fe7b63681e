"""probe_train_serve: the engine's greedy logits agree with the training forward on the engine's own tokens."""
import jax

from benchmarks import probe_train_serve
from fm_jax.config import get_config
from fm_jax.model import init_params


def test_engine_matches_training_forward_float32():
    c = get_config("tiny", vocab_size=512, dtype="float32")
    d = probe_train_serve.probe(init_params(c, jax.random.key(0)), c, "niah_multikey", 256, 2)
    assert d["argmax_agreement"] == 1.0
    assert d["max_logit_diff"] < 1e-4          # float32 throughout (logits of order 1): reduction order only
    assert len(d["per_prompt"]) == 2
    for row in d["per_prompt"]:
        assert 0 <= row["greedy_score"] <= 1 and 0 <= row["teacher_forced_acc"] <= 1
        assert len(row["generated"]) == len(row["answer"]) + 1
