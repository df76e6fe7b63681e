#!/usr/bin/env bash
# Copy the run's model and logs to $OUT (files of at most 15 MiB: the model tarball is split).
cd /tmp/run || exit 1
tar czf /tmp/model.tgz model 2>/dev/null || tar czf /tmp/model.tgz pretrain2/params 2>/dev/null || tar czf /tmp/model.tgz pretrain/params
split -b 15M /tmp/model.tgz "$OUT/model.tgz.part-"
cp pretrain/metrics.jsonl pretrain/summary.json steps.log "$OUT/" 2>/dev/null
[ -d pretrain2 ] && for f in metrics.jsonl summary.json; do cp "pretrain2/$f" "$OUT/phase2_$f"; done
tar czf "$OUT/logs.tgz" chain.log pretrain/perf.jsonl pretrain2/perf.jsonl dump/manifest.json fit/metrics.jsonl fit/eval_final.json eval 2>/dev/null
[ -d "$OLDPWD/.jax_cache" ] && tar czf "$OUT/jax_cache.tgz" -C "$OLDPWD" .jax_cache
ls -la "$OUT"
