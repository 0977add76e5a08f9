"""What guards a run directory while a run owns it: an exclusive lock, and preemption signals.

Lock: `fcntl.flock` on DIR/.lock, taken before anything in DIR is read or written and released
by the OS when the process ends, however it ends; the file holds the owner's pid, which a second
run names when it stops. Only process 0 of a multi-process run takes it (the others share it).

Preemption: SIGTERM (what TPU and cluster schedulers send) and SIGINT (Ctrl-C) set a flag; the
loop saves at the next step boundary and raises `Preempted` (exit status 75, "try again"). A
second signal exits at once. On several processes the flag is agreed on through JAX's
preemption sync point (SIGTERM, seen by the coordination service), so all save the same step.
"""
import fcntl
import os
import pathlib
import signal
import sys
import threading

import jax

from lcjax import cli

EXIT_PREEMPTED = 75


class Lock:
  def __init__(self, workdir):
    self.path = pathlib.Path(workdir) / ".lock"
    self._fd = None
    if jax.process_index() != 0:
      return
    if self.path.parent.exists() and not self.path.parent.is_dir():
      raise ValueError(f"--workdir={workdir} exists and is not a directory; choose another path")
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      raise ValueError(f"--workdir={workdir} is in use by process {holder} (it holds "
                       f"{self.path}); wait for that run to end, stop it, or use another "
                       "--workdir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    self._fd = fd

  def release(self):
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


class Preempted(cli.Stop):
  def __init__(self, line: str):
    super().__init__(line, EXIT_PREEMPTED)


class Preemption:
  """Context manager: while inside, SIGTERM/SIGINT set `signal_name`; a second exits at once."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}
    self._multi = jax.process_count() > 1

  def __enter__(self):
    self._install()
    return self

  def _install(self):
    if threading.current_thread() is not threading.main_thread():
      return
    # Several processes: SIGTERM is left to JAX's preemption notifier (see requested).
    for signum in (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT):
      if signum not in self._previous:
        self._previous[signum] = signal.signal(signum, self._handle)

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.signal_name is not None:
      print(f"lcjax: {name} again: exiting at once, without saving", file=sys.stderr, flush=True)
      os._exit(128 + signum)
    self.signal_name = name
    print(f"[lcjax] {name}: saving a checkpoint at the next step boundary (send it again to "
          "exit at once)", file=sys.stderr, flush=True)

  def requested(self, step: int) -> bool:
    """Whether the run stops at this step boundary (the same answer on every process)."""
    if not self._multi:
      return self.signal_name is not None
    from jax.experimental import multihost_utils
    try:
      reached = multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # processes set up without jax.distributed's preemption service
      self._multi = False
      self._install()  # SIGTERM through this process's own handler, then
      return self.signal_name is not None
    if reached:
      self.signal_name = self.signal_name or "SIGTERM"
    return reached
