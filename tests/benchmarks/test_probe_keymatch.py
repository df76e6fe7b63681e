"""benchmarks.probe_keymatch: which needle a model copies (the bookkeeping, with a stand-in model)."""
from types import SimpleNamespace

import numpy as np

from benchmarks import probe_keymatch as pk
from train import tasks as T


def test_picked_counts_the_needle_whose_first_value_comes_out(monkeypatch):
    def copies_the_last_needle(params, config, prompt, new_tokens, mode):
        # the token after the last VAL of each prompt: the last needle's first value
        firsts = [row[np.flatnonzero(row == T.VAL)[-1] + 1] for row in np.asarray(prompt)]
        return SimpleNamespace(tokens=np.array(firsts, np.int32)[:, None])

    monkeypatch.setattr(pk, "generate", copies_the_last_needle)
    seed = T.HELDOUT_SEED + 7
    row = pk.probe(None, None, context_len=300, n_needles=3, key_len=2, n=6, seed=seed)
    assert row["picked"] == [0, 0, 6, 0]
    targets = [T.make_example("niah_multikey", 300, seed + i, n_needles=3).meta["target_items"][0] for i in range(6)]
    assert row["acc1"] == np.mean([t == 2 for t in targets]) and row["chance"] == 1 / 3
