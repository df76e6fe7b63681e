#!/usr/bin/env bash
# Wait up to $1 seconds for the background chain (gpu_chain.sh) to reach step $2 of its steps.log (default: done).
end=$(( $(date +%s) + ${1:-540} ))
while [ "$(date +%s)" -lt "$end" ]; do
  grep -q "${2:-done in}" /tmp/run/steps.log 2>/dev/null && break
  pgrep -f "^bash benchmarks/reproduce_mini.sh" > /dev/null || break
  sleep 5
done
PHASE=/tmp/run/pretrain; [ -d /tmp/run/pretrain2 ] && PHASE=/tmp/run/pretrain2   # the phase running (gpu_chain.sh STEPS2)
cat /tmp/run/steps.log 2>/dev/null
tail -n 1 $PHASE/metrics.jsonl 2>/dev/null | head -c 400; echo
tail -n 1 $PHASE/perf.jsonl 2>/dev/null
grep -v -i warn /tmp/run/chain.log | tail -4
# the latest float32 weights come back with every poll (a lease that ends takes its disk with it):
# `cat master.tgz.part-* | tar xzf -` here, then `train.pretrain --init-params master` continues
if [ -n "${OUT:-}" ] && [ -d $PHASE/master ]; then
  tar czf - -C $PHASE master metrics.jsonl | split -b 14M - "$OUT/master.tgz.part-"
fi
