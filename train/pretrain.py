"""Pretrain a V4-architecture backbone on the synthetic task suite: ``python -m train.pretrain``.

* Model: a preset (default ``mini``) with float32 master weights; the forward runs on a copy cast to the
  preset's dtypes (bfloat16 for ``mini``), through `train.lm` (the backbone's layers, dense masked
  attention, the Lightning Indexer's KL loss).
* Data: `train.tasks.make_batch` (every task of the suite mixed, or ``--tasks``); the loss is next-token
  cross-entropy on the answer tokens (and the closing EOS), plus ``--prompt-weight`` times the same over the
  prompt (`train.lm.prompt_loss`). The prompt's filler and needles are random, but its structure (filler
  words, the item grammar, restated needles) grows the previous-token and copy heads a lookup is built from:
  with weight 1 a from-scratch run learns copying and variable tracking that answer-only runs never did
  (issue 9, ``benchmarks/results/ablate-prompt-loss-h200.json``, attempt 9).
* Curriculum: ``--curriculum LEN:STAGE:FRACTION,...`` splits ``--steps`` into phases of one context
  length and one indexer stage each (``dense`` warm-up, then ``sparse`` top-k, `train.lm`); every phase
  keeps about ``--tokens-per-step`` tokens per batch. The stage is data, not code: one compilation per
  context length.
* Optimizer: global-norm clipping, optax AdamW (decay on matrices only) with linear warm-up and cosine decay.
* Checkpoints: orbax ``CheckpointManager`` under ``OUT/ckpt`` every ``--save-every`` steps. A rerun with
  the same ``--out`` resumes from the latest one; each step's batch is a pure function of ``(seed, step)``,
  so the resumed run reproduces the uninterrupted run's metrics exactly.
* Logs: ``OUT/metrics.jsonl`` (losses, answer accuracy overall and per task (``acc/<task>``, the training
  rows since the previous line), the accuracy of each row's first supervised token per task (``acc1/<task>``:
  for the needle tasks the first answer token, the key -> value match itself), per-layer indexer KL, lr,
  grad norm, tokens seen),
  ``OUT/perf.jsonl`` (timings), TensorBoard scalars, a tqdm bar; teacher-forced answer accuracy on held-out
  examples per task at ``--eval-lengths`` every ``--eval-every`` steps.
* Export: ``OUT/params`` (`fm_jax.checkpoint.save_params`, the preset's dtypes: what inference loads),
  ``OUT/master`` (the float32 master weights, also refreshed at every checkpoint: ``--init-params`` continues
  from them in a new run, e.g. on the next GPU lease) and ``OUT/summary.json`` (command, steps, tokens seen,
  wall time, final evaluation).

Example (CPU smoke run)::

    python -m train.pretrain --preset tiny --out /tmp/fm_pre --steps 20 --curriculum 256:dense:0.5,256:sparse:0.5 \
        --tokens-per-step 1024 --override vocab_size=512
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from fm_jax import checkpoint as fm_ckpt
from fm_jax import cli
from fm_jax.config import get_config
from fm_jax.model import init_params
from train import data as D
from train import lm
from train import tasks as T
from train.dump import _parse_override
from train.fit import Logger

ANSWER_ROOM = 64  # batches are padded to context length + this, so every phase has one shape (one compile)
TRAJECTORY_ARGS = ("preset", "override", "steps", "curriculum", "tokens_per_step", "lr", "warmup", "min_lr_ratio",
                   "weight_decay", "clip", "b1", "b2", "kl_weight", "prompt_weight", "seed", "tasks", "task_params",
                   "init_params")


@dataclass(frozen=True)
class Phase:
    length: int
    stage: str
    start: int   # first step of the phase
    end: int     # one past its last step
    batch: int


def parse_curriculum(spec: str, steps: int, tokens_per_step: int) -> list[Phase]:
    """``"1024:dense:0.25,4096:sparse:0.75"`` -> phases covering ``range(steps)`` (fractions renormalised)."""
    items = []
    for part in spec.split(","):
        bits = part.strip().split(":")
        if len(bits) != 3:
            raise ValueError(f"curriculum item {part!r} is not LEN:STAGE:FRACTION")
        length, stage, frac = int(bits[0]), bits[1], float(bits[2])
        if length <= 0 or frac <= 0 or stage not in lm.STAGES:
            raise ValueError(f"curriculum item {part!r}: LEN > 0, STAGE in {lm.STAGES}, FRACTION > 0")
        items.append((length, stage, frac))
    total = sum(f for _, _, f in items)
    phases, start = [], 0
    for i, (length, stage, frac) in enumerate(items):
        end = steps if i == len(items) - 1 else min(steps, start + round(steps * frac / total))
        if end > start:
            phases.append(Phase(length, stage, start, end, max(1, tokens_per_step // length)))
        start = end
    return phases


def phase_at(phases: list[Phase], step: int) -> Phase:
    return next(p for p in phases if p.start <= step < p.end)


# ------------------------------------------------------------------------------------------ params
def split_trainable(params):
    """(float leaves, other leaves) as two trees of the same structure with None in the other's places:
    integer tables such as the hash-routing `tid2eid` are parameters but not trained."""
    is_float = lambda x: jnp.issubdtype(x.dtype, jnp.floating)
    return (jax.tree.map(lambda x: x if is_float(x) else None, params),
            jax.tree.map(lambda x: None if is_float(x) else x, params))


def merge(a, b):
    return jax.tree.map(lambda x, y: y if x is None else x, a, b, is_leaf=lambda x: x is None)


def cast_like(params, template):
    """Cast every leaf to the dtype of the matching leaf of `template` (the preset's own dtypes)."""
    return jax.tree.map(lambda x, t: x.astype(t.dtype), params, template)


def flatten(trainable):
    """Trainable leaves as two float32 vectors, {"matrix": weight-decayed (ndim >= 2), "vector": the rest},
    plus the function that rebuilds the tree. The optimizer runs on these: per-leaf updates over the
    model's hundreds of leaves made most of the training step's HLO and of its compile time."""
    mat = jax.tree.map(lambda x: x if x.ndim >= 2 else None, trainable)
    vec = jax.tree.map(lambda x: None if x.ndim >= 2 else x, trainable)
    (fm, un_m), (fv, un_v) = ravel_pytree(mat), ravel_pytree(vec)
    return {"matrix": fm, "vector": fv}, lambda flat: merge(un_m(flat["matrix"]), un_v(flat["vector"]))


def init_state(master, tx):
    """The training state of float32 master params: {"params", "opt_state" (over `flatten`'s vectors), "step"}."""
    flat, _ = flatten(split_trainable(master)[0])
    return {"params": master, "opt_state": tx.init(flat), "step": jnp.asarray(0, jnp.int32)}


def param_template(config, key):
    return jax.eval_shape(functools.partial(init_params, config), key)


# ------------------------------------------------------------------------------------------ step
def make_optimizer(args, total_steps: int):
    warmup = max(0, min(args.warmup, total_steps - 1))
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, max(total_steps, warmup + 1),
                                               end_value=args.lr * args.min_lr_ratio)
    decay_mask = lambda flat: {"matrix": True, "vector": False}  # the groups of `flatten`
    tx = optax.adamw(sched, b1=args.b1, b2=args.b2, weight_decay=args.weight_decay, mask=decay_mask)
    if args.clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(args.clip), tx)
    return tx, sched


def loss_fn(trainable, frozen, template, config, batch, stage, kl_weight: float, prompt_weight: float = 0.0):
    params = cast_like(merge(trainable, frozen), template)
    logits, auxes = lm.forward_train(params, config, batch["tokens"], stage)
    nll = lm.next_token_nll(logits, batch["tokens"])  # one log-softmax over [B, T, V] for both losses
    ce, acc, row_acc = lm.lm_loss(logits, batch["tokens"], batch["loss_mask"], nll)
    prompt_ce = lm.prompt_loss(nll, batch["tokens"], batch["loss_mask"])
    kls = {f"kl/l{i}": a["kl"] for i, a in enumerate(auxes) if "kl" in a}
    kl = sum(kls.values()) / max(len(kls), 1)
    n_att = {f"attended/l{i}": a["n_attended"] for i, a in enumerate(auxes) if "n_attended" in a}
    row_first = lm.first_hit(logits, batch["tokens"], batch["loss_mask"])
    metrics = {"lm_loss": ce, "prompt_loss": prompt_ce, "answer_acc": acc, "row_acc": row_acc, "row_first": row_first,
               "kl": kl, **kls, **n_att}
    return ce + prompt_weight * prompt_ce + kl_weight * kl, metrics


def build_train_step(config, template, tx, kl_weight: float, prompt_weight: float = 0.0):
    @functools.partial(jax.jit, donate_argnames=("state",))
    def train_step(state, batch, sparse):
        """`sparse`: bool array (the stage is data, so both stages share one compilation per length)."""
        trainable, frozen = split_trainable(state["params"])
        flat, unflatten = flatten(trainable)
        (loss, metrics), grads = jax.value_and_grad(
            lambda f: loss_fn(unflatten(f), frozen, template, config, batch, sparse, kl_weight,
                              prompt_weight), has_aux=True)(flat)
        updates, opt_state = tx.update(grads, state["opt_state"], flat)
        flat = optax.apply_updates(flat, updates)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm}
        return {"params": merge(unflatten(flat), frozen), "opt_state": opt_state, "step": state["step"] + 1}, metrics
    return train_step


def load_master(path: str, config, template):
    """Params saved by `fm_jax.checkpoint.save_params` in any dtype (a run's ``OUT/master`` or ``OUT/params``)
    as float32 master weights shaped like `template`: training continues across sessions (the optimizer
    state starts fresh). The checkpoint must have `config`'s architecture."""
    stored = fm_ckpt.load_config(path)
    if stored.replace(dtype=config.dtype) != config:
        raise ValueError(f"--init-params {path}: saved for a different architecture than --preset/--override "
                         "(only the dtype may differ)")
    return cast_like(fm_ckpt.restore_params(path, stored), template)


def precompile(step_fn, state, phases) -> dict:
    """{length: Future of the compiled train step} for the phases' batch shapes, all compiled at once in
    background threads: compiling a shape takes minutes on the GPU, so later phases compile while the
    first one trains instead of stalling the run at each phase boundary."""
    from concurrent.futures import ThreadPoolExecutor

    abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    shapes = {p.length: p.batch for p in phases}
    pool = ThreadPoolExecutor(max_workers=max(1, len(shapes)))
    out = {}
    for length, batch in shapes.items():
        rows = jax.ShapeDtypeStruct((batch, length + ANSWER_ROOM), jnp.int32)
        lowered = step_fn.lower(jax.tree.map(abstract, state),
                                {"tokens": rows, "loss_mask": rows.update(dtype=jnp.float32)},
                                jax.ShapeDtypeStruct((), jnp.bool_))
        out[length] = pool.submit(lowered.compile)
    pool.shutdown(wait=False)
    return out


@functools.partial(jax.jit, static_argnames=("config",))
def answer_accuracy(params, config, tokens, loss_mask):
    """Teacher-forced answer-token accuracy per example [B] (the sparse stage: as at inference)."""
    logits, _ = lm.forward_train(params, config, tokens, "sparse", remat=False)
    return lm.lm_loss(logits, tokens, loss_mask)[2]


def task_accuracy(row_accs, prefix: str = "acc") -> dict:
    """{"<prefix>/<task>": mean of that task's rows} over [(per-row value [B], row tasks)], rows with a
    negative value (nothing supervised) left out: the training curve per task (fetched from the device
    once per log line). prefix "acc": the answer accuracy; "acc1": the first supervised token's."""
    by_task = {}
    for acc, tasks in zip(jax.device_get([a for a, _ in row_accs]), [t for _, t in row_accs]):
        for a, name in zip(acc.tolist(), tasks):
            if a >= 0:
                by_task.setdefault(name, []).append(a)
    return {f"{prefix}/{name}": float(np.mean(v)) for name, v in sorted(by_task.items())}


def fixed_batch(names, length: int, seed: int, batch: int, params: dict | None = None):
    """`train.tasks.make_batch` right-padded to `length + ANSWER_ROOM` tokens: one shape per length.
    `params`: task name -> parameters (`train.tasks.DEFAULT_PARAMS` for the others)."""
    tokens, mask = T.make_batch(names, length, seed, batch, params)
    room = length + ANSWER_ROOM - tokens.shape[1]
    if room < 0:
        raise ValueError(f"answers longer than ANSWER_ROOM={ANSWER_ROOM} tokens at length {length}")
    return (np.pad(tokens, ((0, 0), (0, room)), constant_values=T.PAD),
            np.pad(mask, ((0, 0), (0, room))))


def evaluate(params, config, names, lengths, n_per_task: int) -> dict:
    """Teacher-forced answer accuracy per task and length on held-out examples (seeds >= HELDOUT_SEED),
    one at a time: the dense logits of a 16K-token example already take about a GiB per layer."""
    out = {}
    for length in lengths:
        for name in names:
            accs = []
            for i in range(n_per_task):
                ex = T.make_example(name, length, T.HELDOUT_SEED + i)
                tokens, mask = T.example_rows([ex], length + ANSWER_ROOM)
                accs.append(float(answer_accuracy(params, config, jnp.asarray(tokens), jnp.asarray(mask))[0]))
            out[f"{name}@{length}"] = float(np.mean(accs))
    return out


# ------------------------------------------------------------------------------------------ run
def _check_run_config(out: str, args) -> None:
    D.pin_settings(os.path.join(out, "run_config.json"), {k: getattr(args, k) for k in TRAJECTORY_ARGS},
                   TRAJECTORY_ARGS, f"{out} holds a run with different settings: resuming would not continue "
                   "the same trajectory")


def task_names(spec: str) -> tuple[str, ...]:
    names = T.TASKS if spec == "all" else tuple(spec.split(","))
    for n in names:
        if n not in T.TASKS + T.DRILLS:
            raise ValueError(f"unknown task {n!r}; choose from {T.TASKS + T.DRILLS}")
    return names


def check_task_params(names, task_params) -> None:
    """ValueError unless `task_params` maps tasks of `names` to parameters their generators accept."""
    if task_params is None:
        return
    if not isinstance(task_params, dict) or not all(isinstance(v, dict) for v in task_params.values()):
        raise ValueError("--task-params must be a JSON object {task: {param: value}}")
    for name, kw in task_params.items():
        if name not in names:
            raise ValueError(f"--task-params: {name!r} is not among the training tasks {tuple(names)}")
        try:
            T.make_example(name, 2048, 0, **kw)
        except TypeError as e:
            raise ValueError(f"--task-params {name}: {e}") from e


def run(args) -> dict:
    import orbax.checkpoint as ocp

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    args.override = [list(kv) for kv in args.override]
    _check_run_config(out, args)
    config = get_config(args.preset, **dict(args.override))
    if config.vocab_size < T.VOCAB_SIZE:
        raise ValueError(f"the task suite needs vocab_size >= {T.VOCAB_SIZE}, the config has {config.vocab_size}")
    names = task_names(args.tasks)
    phases = parse_curriculum(args.curriculum, args.steps, args.tokens_per_step)
    key = jax.random.PRNGKey(args.seed)
    template = param_template(config, key)
    master = init_params(config.replace(dtype="float32"), key)
    if args.init_params:
        master = load_master(args.init_params, config, master)
    tx, sched = make_optimizer(args, args.steps)
    state = init_state(master, tx)
    step_fn = build_train_step(config, template, tx, args.kl_weight, args.prompt_weight)

    mngr = ocp.CheckpointManager(os.path.join(out, "ckpt"), options=ocp.CheckpointManagerOptions(
        max_to_keep=args.keep, create=True, cleanup_tmp_directories=True))
    start, latest = 0, mngr.latest_step()
    prior = {"wall_s": 0.0, "tokens_seen": 0}
    if latest is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = mngr.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                meta=ocp.args.JsonRestore()))
        state, prior = restored["state"], restored["meta"]
        start = int(jax.device_get(state["step"]))
        print(f"resuming from step {start} ({os.path.join(out, 'ckpt')})", file=sys.stderr)
    logger = Logger(out, start, tensorboard=not args.no_tensorboard)

    def produce(s):
        ph = phase_at(phases, s)
        seed = args.seed * 1_000_003 + s
        tokens, mask = fixed_batch(names, ph.length, seed, ph.batch, args.task_params)
        return {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask)}, ph, T.batch_tasks(names, seed, ph.batch)

    stop_at = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    tokens_seen, wall0 = int(prior["tokens_seen"]), float(prior["wall_s"])
    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=start, desc="pretrain", unit="step")
    t_run = t_last = time.perf_counter()
    n_tok_last, last_eval = 0, None
    row_accs = []   # (device [B] answer accuracy per row, row tasks) of the steps since the last log line
    row_firsts = []  # (device [B] first-supervised-token hit per row, row tasks), likewise

    def save(done):
        meta = {"step": done, "tokens_seen": tokens_seen, "wall_s": wall0 + time.perf_counter() - t_run}
        mngr.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        save_master()

    def save_master():  # at every checkpoint too: a lease can end mid-run, and this is what --init-params reads
        fm_ckpt.save_params(os.path.join(out, "master"), state["params"], config.replace(dtype="float32"),
                            overwrite=True)

    compiled = precompile(step_fn, state, [p for p in phases if p.end > start and p.start < stop_at])
    pre = D.Prefetcher(produce, range(start, stop_at), depth=4, workers=args.data_workers)
    try:
        for s, (batch, ph, row_tasks) in pre:
            state, metrics = compiled[ph.length].result()(state, batch, jnp.asarray(ph.stage == "sparse"))
            row_accs.append((metrics.pop("row_acc"), row_tasks))
            row_firsts.append((metrics.pop("row_first"), row_tasks))
            done = s + 1
            n_tok = ph.batch * batch["tokens"].shape[1]
            tokens_seen += n_tok
            n_tok_last += n_tok
            if done % args.log_every == 0 or done == args.steps:
                mv = {k: float(v) for k, v in jax.device_get(metrics).items()}
                mv.update(task_accuracy(row_accs))
                mv.update(task_accuracy(row_firsts, "acc1"))
                row_accs, row_firsts = [], []
                logger.metrics({"step": done, "lr": float(sched(s)), "length": ph.length, "stage": ph.stage,
                                "tokens_seen": tokens_seen, **mv}, prefix="train/")
                now = time.perf_counter()
                logger.perf({"step": done, "tokens_per_s": n_tok_last / max(now - t_last, 1e-9),
                             "elapsed_s": wall0 + now - t_run})
                t_last, n_tok_last = now, 0
                if bar is not None:
                    bar.set_postfix(len=ph.length, stage=ph.stage, loss=f"{mv['lm_loss']:.3f}",
                                    acc=f"{mv['answer_acc']:.3f}", kl=f"{mv['kl']:.3f}")
            if args.eval_every and (done % args.eval_every == 0 or done == args.steps):
                params = cast_like(state["params"], template)
                last_eval = evaluate(params, config, tuple(dict.fromkeys(names)), args.eval_lengths,
                                     args.eval_examples)
                logger.metrics({"step": done, "eval": last_eval}, prefix="eval/")
            if done % args.save_every == 0 or done == args.steps:
                save(done)
            if bar is not None:
                bar.update(1)
    finally:
        D.close_loop(pre, mngr, bar)
        logger.close()
    result = {"out": out, "step": int(jax.device_get(state["step"])), "resumed_from": start,
              "tokens_seen": tokens_seen, "wall_s": round(wall0 + time.perf_counter() - t_run, 1)}
    mngr.close()
    if stop_at < args.steps:
        result["stopped"] = True
        return result
    fm_ckpt.save_params(os.path.join(out, "params"), cast_like(state["params"], template), config, overwrite=True)
    summary = {**result, "command": "python -m train.pretrain " + " ".join(args.argv), "preset": args.preset,
               "config": {k: v for k, v in args.override}, "phases": [vars(p) for p in phases],
               "device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "final_eval": last_eval}
    D.atomic_write_json(os.path.join(out, "summary.json"), summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m train.pretrain", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="run directory (a rerun resumes from its latest checkpoint)")
    p.add_argument("--preset", default="mini")
    p.add_argument("--override", type=_parse_override, action="append", default=[],
                   help="config field override key=value (JSON value), repeatable")
    p.add_argument("--tasks", default="all", help="comma-separated task names, or 'all'; batch rows cycle through "
                   "the list, so a name given twice gets twice the rows")
    p.add_argument("--task-params", type=json.loads, default=None,
                   help="JSON {task: {param: value}} for the training batches, e.g. longer needle values "
                        "'{\"niah_single\": {\"value_len\": 16}}' (more supervised tokens per example); held-out "
                        "evaluation keeps train.tasks.DEFAULT_PARAMS")
    p.add_argument("--init-params", type=cli.existing_dir, default=None,
                   help="start from these backbone params (an earlier run's OUT/master or OUT/params) instead of "
                        "a random init; the optimizer starts fresh")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=cli.positive_int, default=3000)
    o.add_argument("--curriculum", default="1024:dense:0.2,2048:sparse:0.3,4096:sparse:0.5",
                   help="LEN:STAGE:FRACTION phases (STAGE dense|sparse)")
    o.add_argument("--tokens-per-step", type=cli.positive_int, default=65536)
    o.add_argument("--lr", type=cli.float_range(0.0, None, lo_open=True), default=1e-3)
    o.add_argument("--warmup", type=cli.nonneg_int, default=200)
    o.add_argument("--min-lr-ratio", type=cli.unit_float, default=0.1)
    o.add_argument("--weight-decay", type=cli.float_range(0.0), default=0.1)
    o.add_argument("--clip", type=float, default=1.0, help="global-norm clip (<= 0: off)")
    o.add_argument("--b1", type=cli.unit_float, default=0.9)
    o.add_argument("--b2", type=cli.unit_float, default=0.95)
    o.add_argument("--kl-weight", type=cli.float_range(0.0), default=1.0, help="weight of the indexer KL loss")
    o.add_argument("--prompt-weight", type=cli.float_range(0.0), default=0.0,
                   help="weight of the next-token loss over the prompt (`lm.prompt_loss`) beside the answer's; 1 "
                        "trained checkpoints/mini (0, the default, keeps earlier runs' commands reproducible)")
    o.add_argument("--seed", type=int, default=0, help="init and data")
    r = p.add_argument_group("run")
    r.add_argument("--log-every", type=cli.positive_int, default=20)
    r.add_argument("--eval-every", type=cli.nonneg_int, default=500, help="0: never")
    r.add_argument("--eval-lengths", type=lambda s: tuple(int(x) for x in s.split(",")), default=(4096, 16384))
    r.add_argument("--eval-examples", type=cli.positive_int, default=8, help="held-out examples per task and length")
    r.add_argument("--save-every", type=cli.positive_int, default=500)
    r.add_argument("--keep", type=cli.positive_int, default=2)
    r.add_argument("--data-workers", type=cli.positive_int, default=2)
    r.add_argument("--stop-after", type=int, default=None, help="stop after this step (simulates a kill)")
    r.add_argument("--no-tensorboard", action="store_true")
    r.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:  # checked before any work (run() parses it again)
        parse_curriculum(args.curriculum, args.steps, args.tokens_per_step)
    except ValueError as e:
        raise SystemExit(f"--curriculum: {e}") from e
    if args.stop_after is not None and args.stop_after <= 0:
        raise SystemExit("--stop-after must be positive")
    names = task_names(args.tasks)
    check_task_params(names, args.task_params)
    res = run(args)
    print(json.dumps({k: v for k, v in res.items() if k in ("out", "step", "tokens_seen", "wall_s", "final_eval")}),
          file=sys.stderr)
    return res


if __name__ == "__main__":
    sys.exit(cli.run(main))
