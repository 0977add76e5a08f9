#!/usr/bin/env bash
# A SLURM job of lcjax on a GPU cluster: one process per node, each driving all of its GPUs, the
# same command on every node; JAX reads the coordinator (the first node) and the ranks from
# SLURM's variables (lcjax.distributed). Submit from a directory every node sees:
#
#   sbatch --nodes=2 scripts/launch_slurm.sh --config=experiments/llama3_8b.py \
#     --workdir=/shared/runs/8b --config.mesh.fsdp=8 --config.mesh.dcn_data=2
#
# mesh.<axis> sizes are per node (NVLink), mesh.dcn_<axis> across nodes (network): their
# products are 8 and --nodes. Process 0 prints what a one-node run prints (the metrics' path,
# the final JSON) to slurm-<job>.out; every process writes its own checkpoint shards.
# One process per GPU instead: --ntasks-per-node=8 --gpus-per-task=1 (then mesh sizes are per
# GPU: mesh.dcn_* multiply to nodes x 8). PYTHON names the interpreter of an environment with
# jax[cuda12] and lcjax installed (pip install -e . "jax[cuda12]==0.10.2" -r requirements.txt).
# Not run here: this workplace has no cluster; the same code path is tested with local processes
# (scripts/launch_local.sh, tests/test_multiprocess.py).
#SBATCH --job-name=lcjax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --signal=TERM@120
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "${BASH_SOURCE[0]}")/..}"
# --signal: SIGTERM 120 s before the time limit; every process saves at the next step boundary
# and exits 75 (docs/reliability.md). --kill-on-bad-exit: one failed process ends the job.
exec srun --kill-on-bad-exit=1 "${PYTHON:-python}" -m lcjax.main "$@"
