"""Train the Memory Indexer on dumped data, backbone-free (SPEC §6): ``python -m train.fit``.

* Model: one scorer per target layer (``fm_jax.memory_indexer``), initialised from the backbone's
  Lightning Indexer (``DATA/li_init.safetensors``, written by ``train.dump``), at random, or from a
  FlashMemory checkpoint. Every layer's scorer is trained on the shared golden labels; the loss is the
  mean over layers of BCE (or focal loss, ``alpha`` / ``gamma``) on the pre-sigmoid logits of each
  sample's positives and sampled negatives (``train.data``).
* Precision: float32 master weights and optimizer state; the forward runs on a bfloat16 copy of the
  weights and bfloat16 hidden states (``--compute-dtype``), with float32 accumulation inside the scorer.
* Optimizer: global-norm clipping, then optax AdamW (no decay on ``q_norm_weight``) with linear warm-up
  and cosine decay to ``min_lr_ratio * lr`` over ``--steps``.
* Parallelism: the jitted step is data parallel over the mesh axis ``data`` spanning ``jax.devices()``
  (batch sharded with ``NamedSharding(mesh, P("data"))``, state replicated); works with one device.
* Checkpoints: orbax ``CheckpointManager`` under ``OUT/ckpt`` (every ``--save-every`` steps, keep
  ``--keep``). A rerun with the same ``--out`` resumes from the latest checkpoint; since the batch of every
  step is a pure function of ``(seed, step)`` (``train.data.BatchStream``) and the step has no other
  randomness, the resumed run reproduces the uninterrupted run's metrics exactly.
* Logs: ``OUT/metrics.jsonl`` (deterministic: losses, lr, grad norm, batch and evaluation metrics),
  ``OUT/perf.jsonl`` (timings), TensorBoard scalars under ``OUT/tb`` (tensorboardX, else tensorboard's
  event writer, else a one-line notice), a tqdm bar.
* Evaluation on the validation documents every ``--eval-every`` steps and at the end
  (``train.evaluate``); export at the end to ``OUT/export/indexer.safetensors`` (FlashMemory joint
  format) and ``OUT/export/orbax`` (params pytree).

Example (tiny preset, CPU)::

    python -m train.fit --data /tmp/fm_data --out /tmp/fm_run --steps 300 --batch-size 16
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fm_jax import cli, interop
from fm_jax import memory_indexer as mi
from train import data as D
from train.dump import _parse_override
from train.evaluate import METRICS, evaluate_dataset

# arguments that shape the training trajectory: a resumed run must use the same values
TRAJECTORY_ARGS = ("data", "steps", "batch_size", "lr", "warmup", "min_lr_ratio", "weight_decay", "clip", "b1",
                   "b2", "loss", "focal_alpha", "focal_gamma", "neg_ratio", "min_neg", "n_hard", "hard_neg_ckpt",
                   "buckets", "soft_labels", "seed", "compute_dtype", "init", "val_fraction", "val_data", "impl",
                   "ensemble", "threshold", "log_every", "eval_every", "indexer_override")


RECALL_AT_KEEP = (0.05, 0.1, 0.2)  # logged points of the recall vs keep-ratio curve


@dataclass(frozen=True)
class StepConfig:
    """Everything the compiled train step depends on (hashable; one compile per distinct value)."""
    indexer: mi.IndexerConfig
    loss: str = "bce"
    focal_alpha: float | None = 0.25
    focal_gamma: float = 2.0
    compute_dtype: str = "bfloat16"
    impl: str = "xla"
    lr: float = 1e-3
    warmup: int = 100
    steps: int = 1000
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.999


# ---------------------------------------------------------------------------------------------------
# optimizer / loss / step
# ---------------------------------------------------------------------------------------------------
def lr_schedule(sc: StepConfig):
    warmup = max(0, min(sc.warmup, sc.steps - 1))
    return optax.warmup_cosine_decay_schedule(0.0 if warmup else sc.lr, sc.lr, warmup, max(sc.steps, warmup + 1),
                                              end_value=sc.lr * sc.min_lr_ratio)


def make_optimizer(sc: StepConfig) -> optax.GradientTransformation:
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
    adamw = optax.adamw(lr_schedule(sc), b1=sc.b1, b2=sc.b2, weight_decay=sc.weight_decay, mask=decay_mask)
    if sc.clip and sc.clip > 0:
        return optax.chain(optax.clip_by_global_norm(sc.clip), adamw)
    return adamw


def layer_logits(layer_params, c: mi.IndexerConfig, hidden, keys, positions, lengths, impl: str):
    """Pre-sigmoid logits [B, M] of one scorer (``fm_jax.memory_indexer.layer_logits``); masked -> -inf."""
    return mi.layer_logits(layer_params, c, hidden, keys, positions, lengths, impl=impl)


def loss_and_metrics(params, batch, sc: StepConfig):
    c = sc.indexer
    cdt = jnp.dtype(sc.compute_dtype)
    cparams = jax.tree.map(lambda x: x.astype(cdt), params)
    hidden = batch["hidden"].astype(cdt)
    mask = batch["mask"] & (batch["weight"][:, None] > 0)
    m = mask.astype(jnp.float32)
    denom = jnp.maximum(m.sum(), 1.0)
    labels = batch["labels"]
    total = 0.0
    probs = []
    for li, name in enumerate(c.layer_names):
        lg = layer_logits(cparams[name], c, hidden[:, li], batch["keys"][:, li], batch["positions"],
                          batch["lengths"], sc.impl)
        lg = jnp.where(mask, lg, 0.0)
        if sc.loss == "focal":
            el = optax.sigmoid_focal_loss(lg, labels, alpha=sc.focal_alpha, gamma=sc.focal_gamma)
        else:
            el = optax.sigmoid_binary_cross_entropy(lg, labels)
        total = total + (el * m).sum() / denom
        probs.append(jax.nn.sigmoid(lg))
    loss = total / len(c.layer_names)
    prob = mi.ensemble_scores(probs, mode=c.ensemble)
    pos = (labels > 0) & mask
    kept = (prob >= c.threshold) & mask
    f32 = jnp.float32
    metrics = {
        "loss": loss,
        "batch_recall": (kept & pos).sum().astype(f32) / jnp.maximum(pos.sum(), 1).astype(f32),
        "batch_precision": (kept & pos).sum().astype(f32) / jnp.maximum(kept.sum(), 1).astype(f32),
        "batch_keep": kept.sum().astype(f32) / denom,
        "batch_pos_frac": pos.sum().astype(f32) / denom,
    }
    return loss, metrics


_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def _train_step(state, batch, sc: StepConfig, tx):
    (_, metrics), grads = jax.value_and_grad(loss_and_metrics, has_aux=True)(state["params"], batch, sc)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics["grad_norm"] = _tree_norm(grads)
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics


@functools.lru_cache(maxsize=8)
def build_step(sc: StepConfig, mesh: Mesh):
    """(optimizer, jitted step) for ``sc``; cached so repeated runs in one process compile once."""
    tx = make_optimizer(sc)
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    step = jax.jit(functools.partial(_train_step, sc=sc, tx=tx), in_shardings=(repl, data),
                   out_shardings=(repl, repl))  # no donation: an async checkpoint may still read the state
    return tx, step


def make_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), ("data",))


# ---------------------------------------------------------------------------------------------------
# logging
# ---------------------------------------------------------------------------------------------------
class _TBEvents:
    """Minimal scalar writer on tensorboard's event-file writer (used when tensorboardX is missing)."""

    def __init__(self, logdir: str):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._ev, self._sum = event_pb2, summary_pb2
        self._w = EventFileWriter(logdir)

    def add_scalar(self, tag, value, step):
        s = self._sum.Summary(value=[self._sum.Summary.Value(tag=tag, simple_value=float(value))])
        self._w.add_event(self._ev.Event(wall_time=time.time(), step=int(step), summary=s))

    def flush(self):
        self._w.flush()

    def close(self):
        self._w.close()


def open_tensorboard(logdir: str, purge_step: int | None):
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter(logdir, purge_step=purge_step)
    except ImportError:
        pass
    try:
        return _TBEvents(logdir)
    except ImportError:
        print("note: neither tensorboardX nor tensorboard is installed; TensorBoard scalars are off "
              "(metrics.jsonl has everything)", file=sys.stderr)
        return None


def _truncate_jsonl(path: str, max_step: int) -> None:
    """Drop lines logged after ``max_step`` (a resumed run logs them again)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= max_step:
                    keep.append(line)
            except json.JSONDecodeError:
                break  # a torn last line from a kill
    D.atomic_write_bytes(path, "".join(keep).encode())


class Logger:
    def __init__(self, out: str, start_step: int, tensorboard: bool = True):
        self.metrics_path = os.path.join(out, "metrics.jsonl")
        self.perf_path = os.path.join(out, "perf.jsonl")
        for p in (self.metrics_path, self.perf_path):
            _truncate_jsonl(p, start_step)
        self._m = open(self.metrics_path, "a")  # noqa: SIM115 (closed in close())
        self._p = open(self.perf_path, "a")  # noqa: SIM115
        self.tb = open_tensorboard(os.path.join(out, "tb"), start_step + 1 if start_step else None) \
            if tensorboard else None

    def metrics(self, record: dict, prefix: str = ""):
        self._m.write(json.dumps(record, sort_keys=True) + "\n")
        self._m.flush()
        if self.tb is not None:
            for k, v in _flatten(record).items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(prefix + k, v, record["step"])

    def perf(self, record: dict):
        self._p.write(json.dumps(record, sort_keys=True) + "\n")
        self._p.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step":
                    self.tb.add_scalar("perf/" + k, v, record["step"])

    def close(self):
        self._m.close()
        self._p.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif not isinstance(v, (list, str)):
            out[f"{prefix}{k}"] = v
    return out


def _eval_record(res: dict) -> dict:
    rec = {k: res[k] for k in METRICS}
    rec["random_at_same_keep"] = res["baselines_at_same_keep"]["random"]
    rec["recency_at_same_keep"] = res["baselines_at_same_keep"]["recency"]
    cur = res["curve"]
    for rho in RECALL_AT_KEEP:
        if rho in cur["keep_ratio"]:
            rec[f"recall_at_keep_{rho:g}"] = cur["indexer"][cur["keep_ratio"].index(rho)]
    for name, v in res.get("per_layer", {}).items():
        rec[f"{name}_recall"] = v["recall"]
        rec[f"{name}_auc"] = v["auc"]
    return rec


# ---------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------
def export(out: str, c: mi.IndexerConfig, params, dtype: str = "float32") -> dict:
    """FlashMemory joint safetensors + orbax params + the config as JSON under ``OUT/export``."""
    import orbax.checkpoint as ocp

    exp = os.path.join(out, "export")
    os.makedirs(exp, exist_ok=True)
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)).astype(jnp.dtype(dtype)), params)
    cfg = c.replace(param_dtype=dtype)
    st = os.path.join(exp, "indexer.safetensors")
    tmp = st + ".tmp.safetensors"
    interop.save_flashmemory_checkpoint(tmp, cfg, host)
    os.replace(tmp, st)
    ck = ocp.StandardCheckpointer()
    ck.save(os.path.abspath(os.path.join(exp, "orbax")), host, force=True)
    ck.wait_until_finished()
    conf = dataclasses.asdict(cfg)
    conf["target_layers"] = list(cfg.target_layers)
    D.atomic_write_json(os.path.join(exp, "indexer_config.json"), conf)
    return {"safetensors": st, "orbax": os.path.join(exp, "orbax")}


# ---------------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------------
def indexer_config_for(data_dir: str, manifest: dict, init: str, overrides: dict) -> mi.IndexerConfig:
    """The scorer's config: from the dump's ``li_init.safetensors``, else from the ``--init`` checkpoint,
    else the FlashMemory release defaults with d_model / head_dim / target layers from the manifest
    (imported FlashMemory dumps). ``overrides`` apply last."""
    li = os.path.join(data_dir, D.LI_INIT)
    if os.path.exists(li):
        c, _ = interop.load_flashmemory_checkpoint(li)
    elif init not in ("lightning", "random"):
        c, _ = interop.load_flashmemory_checkpoint(init)
    elif init == "lightning":
        raise SystemExit(f"{li} is missing (imported data?): use --init random or --init CHECKPOINT")
    else:
        head_dim = int(manifest["index_key_bytes"]) - 4
        c = mi.IndexerConfig(d_model=int(manifest["d_model"]), head_dim=head_dim, rope_dim=min(64, head_dim),
                             target_layers=tuple(int(x) for x in manifest["target_layers"]))
    # (load_flashmemory_checkpoint takes the dims from the tensor shapes, so overrides go through replace)
    return c.replace(**overrides)


def _load_init(args, c: mi.IndexerConfig):
    if args.init == "lightning":
        c2, params = interop.load_flashmemory_checkpoint(os.path.join(args.data, D.LI_INIT))
        if c2.param_shapes() != c.param_shapes():
            raise SystemExit(f"--init lightning: the Lightning Indexer's shapes {c2.param_shapes()} differ from "
                             f"the configured scorer's {c.param_shapes()} (use --init random)")
    elif args.init == "random":
        params = mi.init_params(c, jax.random.PRNGKey(args.seed))
    else:
        c2, params = interop.load_flashmemory_checkpoint(args.init)
        if c2.target_layers != c.target_layers or c2.param_shapes() != c.param_shapes():
            raise SystemExit(f"--init {args.init}: layers {c2.target_layers} / shapes {c2.param_shapes()} do not "
                             f"match the dump's {c.target_layers} / {c.param_shapes()}")
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def _check_run_config(out: str, args) -> None:
    D.pin_settings(os.path.join(out, "run_config.json"), {k: getattr(args, k) for k in TRAJECTORY_ARGS},
                   TRAJECTORY_ARGS, f"{out} holds a run with different settings: resuming would not continue "
                   "the same trajectory")


def run(args) -> dict:
    import orbax.checkpoint as ocp

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    args.data = os.path.abspath(args.data)
    if args.val_data:
        args.val_data = os.path.abspath(args.val_data)
    _check_run_config(out, args)
    progress = not args.no_progress

    # ---- config and data ----
    overrides = dict(args.indexer_override)
    if args.ensemble:
        overrides["ensemble"] = args.ensemble
    if args.threshold is not None:
        overrides["threshold"] = args.threshold
    manifest = D.read_manifest(args.data)
    c = indexer_config_for(args.data, manifest, args.init, overrides)
    all_ids = [d["id"] for d in manifest["docs"]]
    if args.val_data:
        train_ids, val_ids = sorted(all_ids), None
    else:
        train_ids, val_ids = D.split_docs(all_ids, args.val_fraction, args.seed)
    D.atomic_write_json(os.path.join(out, "split.json"), {"train": train_ids, "val": val_ids or []})

    hard_path = None
    if args.n_hard > 0 and args.hard_neg_ckpt:
        hard_path = os.path.join(out, "hard_negatives.safetensors")
        if not os.path.exists(hard_path):
            hc, hp = interop.load_flashmemory_checkpoint(args.hard_neg_ckpt)
            D.mine_hard_negatives(D.IndexerDataset(args.data, train_ids), hc, hp, args.n_hard, hard_path,
                                  impl=args.eval_impl, progress=progress, source=os.path.abspath(args.hard_neg_ckpt))
    elif args.n_hard > 0:
        raise SystemExit("--n-hard needs --hard-neg-ckpt (a previous checkpoint to mine them with)")
    train_ds = D.IndexerDataset(args.data, train_ids, hard_negatives=hard_path)
    val_ds = None
    if args.val_data:
        val_ds = D.IndexerDataset(args.val_data)
    elif val_ids:
        val_ds = D.IndexerDataset(args.data, val_ids)
    missing = [lyr for lyr in c.target_layers if lyr not in train_ds.target_layers]
    if missing:
        raise SystemExit(f"the dump lacks target layers {missing}")

    mesh = make_mesh()
    n_dev = mesh.devices.size
    if args.batch_size % n_dev:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {n_dev} devices "
                         "(data parallel over the mesh axis 'data')")
    scfg = D.SamplerConfig(batch_size=args.batch_size, neg_ratio=args.neg_ratio, min_neg=args.min_neg,
                           n_hard=args.n_hard, buckets=tuple(args.buckets), seed=args.seed,
                           soft_labels=args.soft_labels)
    stream = D.BatchStream(train_ds, scfg)

    # ---- model / optimizer / step ----
    sc = StepConfig(indexer=c, loss=args.loss, focal_alpha=args.focal_alpha, focal_gamma=args.focal_gamma,
                    compute_dtype=args.compute_dtype, impl=args.impl, lr=args.lr, warmup=args.warmup,
                    steps=args.steps, min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
                    clip=args.clip, b1=args.b1, b2=args.b2)
    tx, step_fn = build_step(sc, mesh)
    repl, data_sh = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    params = _load_init(args, c)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.asarray(0, jnp.int32)}
    state = jax.device_put(state, repl)

    mngr = ocp.CheckpointManager(
        os.path.join(out, "ckpt"),
        options=ocp.CheckpointManagerOptions(max_to_keep=args.keep, create=True, cleanup_tmp_directories=True,
                                             enable_async_checkpointing=not args.sync_checkpoints))
    start = 0
    latest = mngr.latest_step()
    if latest is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = mngr.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                meta=ocp.args.JsonRestore()))
        state = restored["state"]
        start = int(jax.device_get(state["step"]))
        if start != latest:
            raise SystemExit(f"checkpoint {latest} holds step {start}")
        print(f"resuming from step {start} ({os.path.join(out, 'ckpt')})", file=sys.stderr)
    logger = Logger(out, start, tensorboard=not args.no_tensorboard)
    sched = lr_schedule(sc)

    def produce(s):
        b = stream.batch(s)
        b.pop("entry_ids")
        return jax.device_put(b, data_sh)

    timing = {"eval_s": 0.0}  # evaluation time inside the current logging window (not training time)

    def do_eval(s, params):
        if val_ds is None or len(val_ds) == 0:
            return None
        t0 = time.perf_counter()
        res = evaluate_dataset(params, c, val_ds, impl=args.eval_impl)
        rec = {"step": s, "eval": _eval_record(res)}
        logger.metrics(rec)
        timing["eval_s"] += time.perf_counter() - t0
        return res

    stop_at = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=start, desc="fit", unit="step")
    last_eval = None
    t_run = t_last = time.perf_counter()
    n_last = 0
    pre = D.Prefetcher(produce, range(start, stop_at), depth=args.prefetch, workers=args.data_workers)
    try:
        for s, batch in pre:
            state, metrics = step_fn(state, batch)
            done = s + 1
            n_last += args.batch_size
            if done % args.log_every == 0 or done == args.steps:
                mv = {k: float(v) for k, v in jax.device_get(metrics).items()}
                logger.metrics({"step": done, "lr": float(sched(s)), **mv}, prefix="train/")
                now = time.perf_counter()
                dt = now - t_last - timing["eval_s"]
                logger.perf({"step": done, "samples_per_s": n_last / max(dt, 1e-9),
                             "step_s": dt * args.batch_size / max(n_last, 1), "elapsed_s": now - t_run})
                t_last, n_last, timing["eval_s"] = now, 0, 0.0
                if bar is not None:
                    bar.set_postfix(loss=f"{mv['loss']:.4f}", rec=f"{mv['batch_recall']:.3f}")
            if args.eval_every and done % args.eval_every == 0 and done != args.steps:
                last_eval = do_eval(done, state["params"])
            if done % args.save_every == 0 or done == args.steps:
                mngr.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave({"step": done, "seed": args.seed})))
            if bar is not None:
                bar.update(1)
    finally:
        D.close_loop(pre, mngr, bar)
    result = {"out": out, "step": int(jax.device_get(state["step"])), "resumed_from": start}
    if stop_at < args.steps:  # simulated kill: nothing more (no final eval / export)
        logger.close()
        mngr.close()
        result["stopped"] = True
        return result
    final_path = os.path.join(out, "eval_final.json")
    if start >= args.steps and os.path.exists(final_path):  # rerun of a finished run: nothing to redo
        with open(final_path) as f:
            last_eval = json.load(f)
    elif val_ds is not None:
        last_eval = do_eval(args.steps, state["params"])
    logger.close()
    mngr.close()
    result["export"] = export(out, c, state["params"], args.export_dtype)
    if last_eval is not None:
        D.atomic_write_json(final_path, last_eval)
        result["eval"] = _eval_record(last_eval)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m train.fit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=cli.existing_dir, required=True, help="train.dump output directory")
    p.add_argument("--out", required=True, help="run directory (a rerun resumes from its latest checkpoint)")
    p.add_argument("--val-data", type=cli.existing_dir, default=None,
                   help="separate dump for validation (default: split --data)")
    p.add_argument("--val-fraction", type=cli.float_range(0.0, 0.99), default=0.1,
                   help="documents held out for validation")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=cli.positive_int, default=1000, help="total steps (length of the cosine schedule)")
    o.add_argument("--batch-size", type=cli.positive_int, default=32,
                   help="global batch (multiple of the device count)")
    o.add_argument("--lr", type=cli.float_range(0.0, lo_open=True), default=1e-3)
    o.add_argument("--warmup", type=cli.nonneg_int, default=100)
    o.add_argument("--min-lr-ratio", type=cli.unit_float, default=0.1, help="final lr / peak lr")
    o.add_argument("--weight-decay", type=cli.float_range(0.0), default=0.01)
    o.add_argument("--clip", type=float, default=1.0, help="global-norm clip (<= 0: off)")
    o.add_argument("--b1", type=float, default=0.9)
    o.add_argument("--b2", type=float, default=0.999)
    o.add_argument("--loss", default="bce", choices=("bce", "focal"))
    o.add_argument("--focal-alpha", type=float, default=0.25, help="focal loss alpha (negative: off)")
    o.add_argument("--focal-gamma", type=cli.float_range(0.0), default=2.0)
    o.add_argument("--compute-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    o.add_argument("--init", default="lightning",
                   help="'lightning' (DATA/li_init.safetensors), 'random', or a FlashMemory .safetensors")
    o.add_argument("--seed", type=int, default=0, help="data order, negatives and random init")
    d = p.add_argument_group("samples")
    d.add_argument("--neg-ratio", type=cli.float_range(0.0), default=1.0, help="random negatives per positive")
    d.add_argument("--min-neg", type=cli.nonneg_int, default=8, help="random negatives per sample at least")
    d.add_argument("--n-hard", type=cli.nonneg_int, default=0, help="hard negatives per sample")
    d.add_argument("--hard-neg-ckpt", default=None, help="FlashMemory .safetensors used to mine hard negatives")
    d.add_argument("--buckets", type=lambda s: tuple(int(x) for x in s.split(",")), default=D.DEFAULT_BUCKETS,
                   help="entry-count buckets (comma separated)")
    d.add_argument("--soft-labels", action="store_true", help="positives' targets = vote fraction, not 1")
    d.add_argument("--prefetch", type=cli.positive_int, default=4, help="batches prepared ahead on host threads")
    d.add_argument("--data-workers", type=cli.positive_int, default=4, help="host threads assembling batches")
    m = p.add_argument_group("indexer")
    m.add_argument("--indexer-override", type=_parse_override, action="append", default=[],
                   help="IndexerConfig field override key=value, e.g. n_heads=16 q_lora_rank=64 (with --init "
                        "random; head_dim is fixed by the dumped keys)")
    m.add_argument("--ensemble", default=None, choices=("max", "mean"), help="override the dump's ensemble")
    m.add_argument("--threshold", type=cli.unit_float, default=None, help="override the keep threshold (0.5)")
    m.add_argument("--impl", default="xla", choices=("xla", "auto", "pallas"),
                   help="scorer implementation in the train step (xla is differentiable)")
    m.add_argument("--eval-impl", default="auto", choices=("xla", "auto", "pallas"))
    r = p.add_argument_group("run")
    r.add_argument("--log-every", type=cli.positive_int, default=10)
    r.add_argument("--eval-every", type=cli.nonneg_int, default=500, help="0: only at the end")
    r.add_argument("--save-every", type=cli.positive_int, default=500)
    r.add_argument("--keep", type=cli.positive_int, default=3, help="checkpoints kept")
    r.add_argument("--sync-checkpoints", action="store_true", help="save synchronously")
    r.add_argument("--stop-after", type=cli.positive_int, default=None,
                   help="stop after this step without exporting (simulates a kill; rerun to resume)")
    r.add_argument("--export-dtype", default="float32", choices=("float32", "bfloat16"))
    r.add_argument("--no-tensorboard", action="store_true")
    r.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.focal_alpha is not None and args.focal_alpha < 0:
        args.focal_alpha = None
    for name in ("steps", "log_every", "save_every", "keep"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive")
    res = run(args)
    print(json.dumps({k: v for k, v in res.items() if k != "export"}), file=sys.stderr)
    return res


if __name__ == "__main__":
    sys.exit(cli.run(main))
