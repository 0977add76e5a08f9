"""Host batches built ahead of the device, in one background thread.

    make_batch = lambda s: datasets.train_batch(next_sequence + (s - start) * B, B, rows)
    with data.Prefetcher(make_batch, start, steps, depth=config.data.prefetch) as batches:
      for step, batch in batches:
        ...                     # batches.take_wait_s() -> seconds the loop waited since last
                                # asked: the metric data/wait_s

Yields exactly (step, make_batch(step)) for step = first_step .. stop_step - 1, in order: the
thread only runs make_batch earlier. depth = how many finished batches may wait (0 = no thread:
make_batch runs in the consumer, and wait_s is its whole time). An exception in make_batch is
raised in the consumer at the step it belongs to; leaving the `with` (or close()) early stops
the thread without waiting for the rest.
"""
import queue
import threading
import time

_DONE = object()


class _Failure:
  def __init__(self, error: BaseException):
    self.error = error


class Prefetcher:
  """Iterator of (step, make_batch(step)) for step in [first_step, stop_step), `depth` ahead."""

  def __init__(self, make_batch, first_step: int, stop_step: int, depth: int = 2):
    if depth < 0:
      raise ValueError(f"data.prefetch (the prefetch depth) must be >= 0 (0 = off); got {depth}")
    self._make_batch, self._next_step, self._stop_step = make_batch, first_step, stop_step
    self.wait_s = 0.0  # the consumer's total wait, since the start
    self._unread_wait_s = 0.0
    self._stop = threading.Event()
    self._queue = queue.Queue(maxsize=depth) if depth else None
    self._thread = None
    if depth:
      self._thread = threading.Thread(target=self._produce, args=(first_step,),
                                      name="lcjax-prefetch", daemon=True)
      self._thread.start()

  def _produce(self, step):
    while step < self._stop_step and not self._stop.is_set():
      try:
        item = (step, self._make_batch(step))
      except BaseException as e:  # handed to the consumer, raised there
        self._put(_Failure(e))
        return
      self._put(item)
      step += 1
    self._put(_DONE)

  def _put(self, item):
    while not self._stop.is_set():  # wakes up to notice close() while the queue is full
      try:
        self._queue.put(item, timeout=0.05)
        return
      except queue.Full:
        continue

  def __iter__(self):
    return self

  def __next__(self):
    started = time.perf_counter()
    try:
      if self._queue is None:
        if self._next_step >= self._stop_step:
          raise StopIteration
        item = (self._next_step, self._make_batch(self._next_step))
      else:
        item = self._queue.get() if not self._stop.is_set() else _DONE
    finally:
      waited = time.perf_counter() - started
      self.wait_s += waited
      self._unread_wait_s += waited
    if item is _DONE:
      self.close()
      raise StopIteration
    if isinstance(item, _Failure):
      self.close()
      raise item.error
    self._next_step = item[0] + 1
    return item

  def take_wait_s(self) -> float:
    """Seconds the consumer waited for batches since the last call (for data/wait_s)."""
    waited, self._unread_wait_s = self._unread_wait_s, 0.0
    return waited

  def close(self, timeout_s: float = 30.0):
    """Stops the thread: it exits after the batch in hand, waited for up to timeout_s (a daemon
    thread, it never holds up the interpreter's exit); idempotent."""
    self._stop.set()
    if self._thread is not None:
      while True:  # drained, so a producer blocked on a full queue sees the stop at once
        try:
          self._queue.get_nowait()
        except queue.Empty:
          break
      self._thread.join(timeout_s)
      self._thread = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
