#!/usr/bin/env bash
# The trained miniature end to end: pretrain the `mini` backbone on the task suite (with the Lightning
# Indexer's KL loss), dump golden labels from it, train the Memory Indexer backbone-free, assemble the
# model directory, and evaluate the four modes at one page budget.
#
#   bash benchmarks/reproduce_mini.sh RUN_DIR            # default sizes; the shipped run: benchmarks/gpu_chain.sh
#   SMOKE=1 bash benchmarks/reproduce_mini.sh RUN_DIR    # seconds-scale sizes (CPU), same steps
#
# PRE2 (train.pretrain arguments) adds a second pretraining phase that starts from the first's float32
# master weights with a fresh optimizer (`--init-params`): a restart at a lower learning rate on longer
# prompts (issue 9's attempts 7 -> 7b) as one unattended chain. Under SMOKE any non-empty PRE2 means the
# smoke-sized second phase.
#
# Every step resumes or is skipped when its output exists, so a rerun after an interruption continues.
# RUN_DIR/model is a model directory for `serve.shipped.load_shipped` (what checkpoints/mini holds).
set -euo pipefail
RUN=${1:?usage: reproduce_mini.sh RUN_DIR}
mkdir -p "$RUN"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$RUN/steps.log"; }

if [ "${SMOKE:-0}" = 1 ]; then
  PRE="--steps 6 --curriculum 512:dense:0.5,512:sparse:0.5 --tokens-per-step 1024 --eval-every 0 --save-every 3"
  SMOKE_OVR="--override n_layers=5 --override compress_ratios=[0,4,128,4,4] --override d_model=64"
  PRE="$PRE $SMOKE_OVR"
  [ -n "${PRE2:-}" ] && PRE2="--steps 4 --curriculum 1024:sparse:1.0 --tokens-per-step 2048 --lr 5e-4 --warmup 1 --eval-every 0 --save-every 2 $SMOKE_OVR"
  DUMP="--n-docs 6 --length 1024 --prompt-queries 2"
  FIT="--steps 20 --batch-size 4 --warmup 2 --eval-every 0 --save-every 10"
  EVAL="--lengths 1024,2048 --n 2 --sweep 0.2,0.5"
else
  PRE="${PRE:---steps 3000}"
  DUMP="${DUMP:---n-docs 1200 --length 8192 --prompt-queries 4}"
  FIT="${FIT:---steps 1500 --batch-size 32 --warmup 100 --eval-every 500 --save-every 500}"
  EVAL="${EVAL:---lengths 4096,8192,16384,32768 --n 16}"
fi

t0=$(date +%s)
log "pretrain"
$PY -m train.pretrain --preset mini --out "$RUN/pretrain" --no-progress $PRE
FINAL="$RUN/pretrain"
if [ -n "${PRE2:-}" ]; then
  log "pretrain, phase 2"
  $PY -m train.pretrain --preset mini --out "$RUN/pretrain2" --no-progress --init-params "$RUN/pretrain/master" $PRE2
  FINAL="$RUN/pretrain2"
fi
OVR=$($PY -c "import json,sys; print(' '.join('--override '+k+'='+json.dumps(v, separators=(',', ':'))
      for k, v in json.load(open(sys.argv[1]))['config'].items()))" "$FINAL/summary.json")
log "dump"
$PY -m train.dump --out "$RUN/dump" --preset mini $OVR --model-params "$FINAL/params" \
  --tasks "$($PY -c "from train.tasks import TASKS; print(','.join(TASKS))")" --target-layers 4 \
  --tau 64 --no-progress $DUMP
log "fit"
$PY -m train.fit --data "$RUN/dump" --out "$RUN/fit" --no-progress --no-tensorboard $FIT
log "assemble model"
mkdir -p "$RUN/model"
rm -rf "$RUN/model/backbone" && cp -r "$FINAL/params" "$RUN/model/backbone"
cp "$RUN/fit/export/indexer.safetensors" "$RUN/model/memory_indexer.safetensors"
log "evaluate"
$PY -m serve.evaluate_tasks --ckpt "$RUN/model" --out "$RUN/eval" $EVAL
log "done in $(( $(date +%s) - t0 )) s"
