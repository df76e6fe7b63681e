#!/usr/bin/env bash
# The shipped run on the GPU machine, in the background (it outlives the call while the machine is held):
# reproduce_mini.sh with the sizes of the shipped model, into /tmp/run. Poll with gpu_poll.sh; collect with
# gpu_collect.sh. Env: STEPS, CURRICULUM, LR, WARMUP, TASKS (a weighted list: repeat a name), INIT (continue
# from a run's master weights, `--init-params`; e.g. a carried runs/... directory), TPS (tokens per step),
# TASK_PARAMS (JSON, `--task-params`), PROMPT_WEIGHT (`--prompt-weight`), NDOCS, FITSTEPS, EVAL; STEPS2 (with CURRICULUM2, LR2, WARMUP2) adds the
# second pretraining phase of reproduce_mini.sh (PRE2: from the first phase's master, optimizer restarted).
set -u
# every step of an earlier chain, the evaluation too (a stale one holds most of the GPU memory)
pkill -f "^bash benchmarks/reproduce_mini.sh" ; pkill -f "^python3 -m (train|serve)\." ; sleep 2; rm -rf /tmp/run; mkdir -p /tmp/run
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
# curriculum (attempt 4, the first of the two runs behind checkpoints/mini; see its README): retrieval is learned densely on short prompts (128 per step at 512: off the
# EOS plateau at step ~300, against ~1200 starting at 1K), extended to 1K and 4K, and only then does CSA attend
# the Lightning Indexer's top-k (a sparse stage before the model can retrieve starves it)
# TASK_PARAMS without spaces: reproduce_mini.sh word-splits PRE
COMMON="--tokens-per-step ${TPS:-65536} --eval-every 0 --save-every 500 --log-every 50 --no-tensorboard${TASKS:+ --tasks $TASKS}${TASK_PARAMS:+ --task-params $TASK_PARAMS}${PROMPT_WEIGHT:+ --prompt-weight $PROMPT_WEIGHT}"
export PRE="--steps ${STEPS:-4400} --curriculum ${CURRICULUM:-512:dense:0.25,1024:dense:0.15,4096:dense:0.35,4096:sparse:0.25} --lr ${LR:-1.5e-3} --warmup ${WARMUP:-200} $COMMON${INIT:+ --init-params $INIT}"
export PRE2="${STEPS2:+--steps $STEPS2 --curriculum ${CURRICULUM2:?CURRICULUM2 goes with STEPS2} --lr ${LR2:-5e-4} --warmup ${WARMUP2:-50} $COMMON}"
# compiled executables persist across calls (gpu_collect.sh returns them; carry .jax_cache to reuse)
export JAX_COMPILATION_CACHE_DIR=$PWD/.jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=5
export DUMP="--n-docs ${NDOCS:-480} --length 8192 --prompt-queries 4 --batch-docs 8"
export FIT="--steps ${FITSTEPS:-800} --batch-size 32 --warmup 50 --eval-every 0 --save-every 400"
export EVAL="${EVAL:---lengths 4096,16384 --n 8 --sweep 0.05,0.2}"
export PYTHON=python3
setsid nohup bash benchmarks/reproduce_mini.sh /tmp/run > /tmp/run/chain.log 2>&1 &
echo started
