#!/usr/bin/env bash
# Start the shipped mini pretraining in the background on the GPU machine (it outlives this call while the
# machine is held); poll with benchmarks/gpu_poll.sh. Output: /tmp/run/pretrain.
set -u
pkill -f "^python3 -m train.pretrain" && sleep 3; rm -rf /tmp/run
mkdir -p /tmp/run
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
setsid nohup python3 -m train.pretrain --preset mini --out /tmp/run/pretrain --no-progress --no-tensorboard \
  --steps ${STEPS:-4000} --curriculum ${CURRICULUM:-4096:dense:0.1,4096:sparse:0.9} --tokens-per-step 65536 \
  --lr 1e-3 --warmup 200 --eval-every 0 --save-every 1000 --log-every 50 > /tmp/run/pretrain.log 2>&1 &
echo started
