#!/usr/bin/env bash
# Trains the default experiment (experiments/tiny_cpu.py) on 8 fake CPU devices; rerun to resume.
# WORKDIR=... picks the run directory; extra args go to lcjax.main (e.g. --config.train.steps=100).
# Exits with lcjax.main's status when it fails or is preempted (docs/reliability.md).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
workdir="${WORKDIR:-runs/tiny_cpu}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
python -m lcjax.main --config=experiments/tiny_cpu.py --workdir="$workdir" "$@"
status=$?
# 75: preempted (SIGTERM/SIGINT) after saving a checkpoint: rerun to resume; 3: a non-finite loss
[ "$status" -eq 0 ] || exit "$status"
echo "[lcjax] checkpoints:  $workdir/checkpoints"
echo "[lcjax] metrics:      $workdir/metrics.jsonl (TensorBoard: $workdir/tensorboard)"
echo "[lcjax] text sample:  $workdir/sample.txt"
echo "----- sample -----"
cat "$workdir/sample.txt" 2>/dev/null || echo "(no sample: train.sample_prompt is empty)"
echo
