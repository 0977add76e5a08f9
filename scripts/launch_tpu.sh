#!/usr/bin/env bash
# lcjax on a Cloud TPU VM pod slice: the same command on every worker (one process per host),
# JAX finding the coordinator and the ranks itself (LCJAX_DISTRIBUTED=1 -> lcjax.distributed).
# Run from your workstation, in this repository, with gcloud set up for the project:
#
#   bash scripts/launch_tpu.sh my-v5p-16 us-east5-a --config=experiments/llama3_8b.py \
#     --workdir=/mnt/gcs/runs/8b --config.mesh.fsdp=8
#
# It copies this checkout (git archive of HEAD) to ~/lcjax on every worker, installs it there
# once (jax[tpu] and requirements.txt), then runs python -m lcjax.main with the given flags on
# all workers at once. The workdir must be a directory every worker sees (a gcsfuse mount of a
# bucket, or NFS). On a multislice job add mesh.dcn_<axis> sizes (the islands of DiLoCo:
# mesh.dcn_replica); within a slice the mesh.<axis> sizes multiply to the chips of one slice.
# Not run here: this workplace has no TPU; the same code path is tested with local processes.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "lcjax: error: usage: bash scripts/launch_tpu.sh TPU_NAME ZONE --config=... --workdir=..." >&2
  exit 1
fi
name=$1 zone=$2; shift 2
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ssh_all() { gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$1"; }
git archive --format=tar.gz -o /tmp/lcjax.tar.gz HEAD
gcloud compute tpus tpu-vm scp /tmp/lcjax.tar.gz "$name":/tmp/lcjax.tar.gz --zone="$zone" --worker=all
ssh_all "mkdir -p ~/lcjax && tar -xzf /tmp/lcjax.tar.gz -C ~/lcjax && cd ~/lcjax && \
  (test -f .tpu-installed || (pip install -q -r requirements.txt 'jax[tpu]==0.10.2' && \
   pip install -q --no-deps -e . && touch .tpu-installed))"
printf -v flags ' %q' "$@"
ssh_all "cd ~/lcjax && LCJAX_DISTRIBUTED=1 python -m lcjax.main$flags"
