#!/usr/bin/env bash
# N processes of lcjax.main on this machine, forming one mesh over JAX's distributed runtime
# (gloo collectives between them): how multi-host code is tested and shown without a cluster.
#
#   bash scripts/launch_local.sh 2 --config=experiments/tiny_cpu.py --workdir=runs/two \
#     --config.mesh.data=1 --config.mesh.fsdp=2 --config.mesh.ring=2 --config.mesh.dcn_data=2
#
# Each process gets LCJAX_DEVICES / N fake CPU devices (LCJAX_DEVICES defaults to 8), process 0
# serves the coordination on 127.0.0.1 (a free port, or LCJAX_PORT). Process 0 prints what a
# one-process run prints (metrics, the final JSON); the others' lines come prefixed "[process I]".
# Exit status: the first non-zero one of the processes (0 when all succeed). If one process fails,
# the others get LCJAX_GRACE_S (30) seconds to fail too, then are killed. SIGTERM or SIGINT to
# this script goes to every process: all save at the next step boundary and exit 75 (preempted).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "lcjax: error: usage: bash scripts/launch_local.sh N --config=... --workdir=... [flags]" >&2
  exit 1
fi
n=$1; shift
devices=${LCJAX_DEVICES:-8}
if (( devices % n )); then
  echo "lcjax: error: LCJAX_DEVICES=$devices fake CPU devices do not split into $n processes;" \
       "choose N dividing it" >&2
  exit 1
fi
port=${LCJAX_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$((devices / n))"

pids=()
for ((i = 0; i < n; i++)); do
  args=("$@" --coordinator="127.0.0.1:$port" --num_processes="$n" --process_id="$i")
  if ((i == 0)); then
    python -m lcjax.main "${args[@]}" &
  else
    python -m lcjax.main "${args[@]}" > >(sed -u "s/^/[process $i] /") 2>&1 &
  fi
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
trap 'kill -INT "${pids[@]}" 2>/dev/null' INT

status=0 remaining=("${pids[@]}")
while ((${#remaining[@]})); do
  code=0
  wait -n -p done_pid "${remaining[@]}" || code=$?
  [[ -z "${done_pid:-}" ]] && continue   # a trapped signal interrupted the wait
  still=()
  for p in "${remaining[@]}"; do [[ "$p" != "$done_pid" ]] && still+=("$p"); done
  remaining=("${still[@]}")
  if ((code != 0 && status == 0)); then
    status=$code
    ( sleep "${LCJAX_GRACE_S:-30}"; kill -KILL "${pids[@]}" 2>/dev/null ) &
    killer=$!
  fi
  unset done_pid
done
[[ -n "${killer:-}" ]] && kill "$killer" 2>/dev/null
exit "$status"
