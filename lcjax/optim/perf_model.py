"""Performance model of the offloaded optimizer update (Deep Optimizer States, arXiv 2410.21316).

Each subgroup i holds P_i bytes of fp32 master parameters and S_i = 3 P_i bytes of state
(master params, mu, nu). A subgroup updates either

  on the host:   its gradients go down (P_i bytes, d2h), the host updates S_i bytes, the new
                 parameters go up (P_i bytes, h2d);
  on the device: its state goes up (S_i, h2d), the device updates it, it comes back (S_i, d2h).

The host lane (host updates) runs concurrently with the link-and-device lane (every transfer,
then the device updates), so for the set D of subgroups updated on the device

  T(D) = max( sum_{i not in D} S_i / U_host ,
              sum_{i in D} S_i (1/h2d + 1/d2h + 1/U_dev) + sum_{i not in D} P_i (1/d2h + 1/h2d) )

with bandwidths and throughputs in bytes/s. `choose` picks D to minimise T.
"""
import dataclasses
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class Figures:
  h2d_bps: float           # host -> device bandwidth, bytes/s
  d2h_bps: float           # device -> host bandwidth, bytes/s
  host_update_bps: float   # state bytes the host AdamW updates per second
  device_update_bps: float  # state bytes the device AdamW updates per second

  def __post_init__(self):
    for name, value in dataclasses.asdict(self).items():
      if not value > 0:
        raise ValueError(f"performance figure {name} must be > 0; got {value}")


def predicted_time(figures: Figures, param_bytes, on_device) -> float:
  """T(D) of the module docstring; param_bytes[i] = P_i, on_device[i] = (i in D)."""
  f = figures
  host_lane = link_lane = 0.0
  for p, dev in zip(param_bytes, on_device):
    s = 3 * p
    if dev:
      link_lane += s / f.h2d_bps + s / f.d2h_bps + s / f.device_update_bps
    else:
      host_lane += s / f.host_update_bps
      link_lane += p / f.d2h_bps + p / f.h2d_bps
  return max(host_lane, link_lane)


def choose(figures: Figures, param_bytes) -> tuple[list[bool], float]:
  """(on_device flags, predicted time): largest subgroups first, each moved to the device lane
  when that lowers T. T depends only on the bytes in D and is convex in them (the max of a
  falling and a rising line), so this reaches the optimum up to one subgroup's size."""
  on_device = [False] * len(param_bytes)
  best = predicted_time(figures, param_bytes, on_device)
  for i in sorted(range(len(param_bytes)), key=lambda i: -param_bytes[i]):
    on_device[i] = True
    t = predicted_time(figures, param_bytes, on_device)
    if t < best:
      best = t
    else:
      on_device[i] = False
  return on_device, best


def median_seconds(fn, repeats: int = 5) -> float:
  """Median wall time of `fn()` (which must block until its work is done), after one warm-up."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))
