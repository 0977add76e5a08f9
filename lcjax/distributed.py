"""Start-up of a multi-process run on JAX's own runtime: one process per host (or per GPU), the
same program on every process, `jax.distributed.initialize` before any computation.

Three ways a run becomes multi-process, tried in this order:
- given: `--coordinator=HOST:PORT --num_processes=N --process_id=I` (or the variables
  LCJAX_COORDINATOR, LCJAX_NUM_PROCESSES, LCJAX_PROCESS_ID, which scripts/launch_local.sh sets);
- detected: a SLURM step of several tasks, an Open MPI job of several ranks, or a TPU VM pod
  (LCJAX_DISTRIBUTED=1, which scripts/launch_tpu.sh sets, or TPU_WORKER_HOSTNAMES naming several
  hosts): JAX's own cluster detection finds the coordinator and the ranks;
- neither: one process, nothing to initialize.

On CPU, cross-process collectives go through gloo, so local processes form one mesh: the way
lcjax's multi-host code is tested on a machine without accelerators.
"""
import dataclasses
import os

import jax


@dataclasses.dataclass(frozen=True)
class Processes:
  """How this run's processes find each other; all None = let JAX's cluster detection decide."""
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  @property
  def given(self) -> bool:
    return self.coordinator is not None


def from_flags(coordinator=None, num_processes=None, process_id=None, environ=os.environ):
  """The Processes of a run (None: one process), from the flags, else the environment.
  ValueError names what is missing or inconsistent, before anything connects."""
  coordinator = coordinator or environ.get("LCJAX_COORDINATOR")
  if num_processes is None and environ.get("LCJAX_NUM_PROCESSES"):
    num_processes = int(environ["LCJAX_NUM_PROCESSES"])
  if process_id is None and environ.get("LCJAX_PROCESS_ID"):
    process_id = int(environ["LCJAX_PROCESS_ID"])
  given = [v is not None for v in (coordinator, num_processes, process_id)]
  if any(given) and not all(given):
    raise ValueError("a multi-process run needs all three of --coordinator=HOST:PORT, "
                     f"--num_processes=N and --process_id=I (got coordinator={coordinator}, "
                     f"num_processes={num_processes}, process_id={process_id})")
  if all(given):
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
      raise ValueError(f"--coordinator={coordinator} is not HOST:PORT; e.g. 10.0.0.1:8476")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                       f"{num_processes}); number the processes 0 .. N-1")
    return Processes(coordinator, num_processes, process_id) if num_processes > 1 else None
  return Processes() if _cluster_detected(environ) else None


def _cluster_detected(environ) -> bool:
  """A scheduler started several copies of this program (JAX then detects the ranks itself)."""
  if environ.get("LCJAX_DISTRIBUTED") == "1":
    return True
  if "SLURM_JOB_ID" in environ and int(environ.get("SLURM_STEP_NUM_TASKS",
                                                   environ.get("SLURM_NTASKS", "1"))) > 1:
    return True
  if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  return len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize(processes: Processes | None, *, timeout_s: int = 300):
  """jax.distributed.initialize for a multi-process run (nothing for one process). Must run
  before JAX's backends start; a process that cannot reach the others fails after `timeout_s`."""
  if processes is None or jax.distributed.is_initialized():
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the CPU client's only
  jax.distributed.initialize(processes.coordinator, processes.num_processes,
                             processes.process_id, initialization_timeout=timeout_s)


def is_leader() -> bool:
  """Process 0 alone writes metrics, config, plots and samples (each process writes its own
  checkpoint shards)."""
  return jax.process_index() == 0


_MESSAGE_BYTES = 1024


def agreed(build, *, what: str = "the run's set-up"):
  """build() on every process; if it raises a user error (ValueError, OSError) on any process,
  every process raises the same one line, the first failing process's, instead of the others
  waiting for it in their next collective. One process: build() as is."""
  if jax.process_count() == 1:
    return build()
  import numpy as np
  from jax.experimental import multihost_utils
  from lcjax import cli
  result, error = None, None
  try:
    result = build()
  except (ValueError, OSError) as e:
    error = e
  message = np.zeros(_MESSAGE_BYTES, np.uint8)
  if error is not None:
    text = cli.one_line(error).encode()[:_MESSAGE_BYTES - 1]
    message[:len(text)] = np.frombuffer(text, np.uint8)
    message[-1] = 1
  everyone = np.asarray(multihost_utils.process_allgather(message)).reshape(-1, _MESSAGE_BYTES)
  failed = [i for i, row in enumerate(everyone) if row[-1]]
  if not failed:
    return result
  if error is not None and failed[0] == jax.process_index():
    raise error
  first = bytes(everyone[failed[0], :-1]).rstrip(b"\0").decode(errors="replace")
  raise ValueError(first) from None


def per_process(counts: dict) -> dict:
  """{"<key>/process<i>": value} of every process's `counts` (int values; the same keys on
  every process), gathered on all of them."""
  if jax.process_count() == 1:
    return {f"{k}/process0": int(v) for k, v in counts.items()}
  import numpy as np
  from jax.experimental import multihost_utils
  keys = sorted(counts)
  rows = np.asarray(multihost_utils.process_allgather(
      np.array([counts[k] for k in keys], np.int64))).reshape(jax.process_count(), len(keys))
  return {f"{k}/process{i}": int(rows[i, j]) for i in range(len(rows))
          for j, k in enumerate(keys)}
