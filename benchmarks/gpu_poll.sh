#!/usr/bin/env bash
# Wait up to $1 seconds for the background pretraining to finish, printing its progress.
end=$(( $(date +%s) + ${1:-540} ))
while [ "$(date +%s)" -lt "$end" ]; do
  [ -f /tmp/run/pretrain/summary.json ] && break
  pgrep -f "^python3 -m train.pretrain" > /dev/null || break
  sleep 10
done
tail -c 600 /tmp/run/pretrain/metrics.jsonl 2>/dev/null; echo; tail -2 /tmp/run/pretrain/perf.jsonl 2>/dev/null
grep -v -i warn /tmp/run/pretrain.log | tail -5
ls /tmp/run/pretrain 2>/dev/null; nvidia-smi --query-gpu=memory.used --format=csv,noheader
