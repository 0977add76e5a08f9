"""Cost model: predicted bytes equal what the compiled program's collectives send; HLO parsing; chooser."""
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lcjax.ops import cost_model as cm
from lcjax.ops.hlo_collectives import collective_bytes
from lcjax.ops.sequence_parallel import sequence_parallel_attention

# float32 only: the CPU backend widens bf16 collectives to f32, GPUs and TPUs do not
HLO_CASES = [  # strategy, ring, ulysses, data, batch, heads, kv heads, segments, backward
    ("usp", 2, 4, 1, 2, 4, 2, False, True),  # Hkv < u: kv heads repeated
    ("usp", 4, 2, 1, 1, 6, 2, True, True),
    ("usp", 2, 2, 2, 2, 4, 1, False, False),  # a data axis beside, forward only
    ("ring", 2, 4, 1, 1, 4, 2, True, True),
    ("ulysses", 4, 2, 1, 1, 8, 2, False, True),
    ("allgather", 4, 2, 1, 2, 4, 2, True, True),
]


@pytest.mark.parametrize("case", HLO_CASES, ids=lambda c: "-".join(map(str, c)))
def test_predicted_bytes_equal_compiled_collectives(case):
  strategy, R, U, data, B, H, K, segments, backward = case
  S, D = 64, 8
  mesh = jax.make_mesh((data, R, U), ("data", "ring", "ulysses"), axis_types=(AxisType.Explicit,) * 3)
  sharding = NamedSharding(mesh, P("data" if data > 1 else None, ("ring", "ulysses")))
  arr = lambda h: jax.ShapeDtypeStruct((B, S, h, D), jnp.float32, sharding=sharding)
  ids = jax.ShapeDtypeStruct((B, S), jnp.int32, sharding=sharding) if segments else None

  def attend(q, k, v, seg):
    return sequence_parallel_attention(q, k, v, mesh=mesh, strategy=strategy, causal=True,
                                       q_segment_ids=seg, kv_segment_ids=seg,
                                       implementation="reference")
  fn = jax.grad(lambda *a: jnp.sum(jnp.sin(attend(*a))), argnums=(0, 1, 2)) if backward else attend
  with jax.set_mesh(mesh):
    hlo = jax.jit(fn).lower(arr(H), arr(K), arr(K), ids).compile().as_text()
  shape = cm.AttentionShape(batch=B // data, seq_len=S, num_heads=H, num_kv_heads=K, head_dim=D,
                            bytes_per_element=4, causal=True, segments=segments)
  assert collective_bytes(hlo) == pytest.approx(
      cm.comm_bytes(strategy, shape, R, U, backward=backward))


_HLO = """HloModule m, num_partitions=8

%body (p: (s32[], f32[4,16])) -> (s32[], f32[4,16]) {
  %x = f32[4,16]{1,0} parameter(0)
  %cp = f32[4,16]{1,0} collective-permute(%x), channel_id=1, source_target_pairs={{0,1},{1,2},{2,3},{3,0},{4,5},{5,6},{6,7},{7,4}}
  %a2a = (f32[2,16]{1,0}, f32[2,16]{1,0}) all-to-all(%x, %x), channel_id=2, replica_groups={{0,1},{2,3},{4,5},{6,7}}
}

%cond (p: (s32[], f32[4,16])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%branch_a (p: f32[8]) -> f32[8] {
  ROOT %ar = f32[8]{0} all-reduce(%p), replica_groups=[2,4]<=[8], to_apply=%add
}

%branch_b (p: f32[8]) -> f32[8] {
  ROOT %n = f32[8]{0} negate(%p)
}

ENTRY %main (x: f32[4,16]) -> f32[4,16] {
  %w = (s32[], f32[4,16]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %ag = bf16[8,16]{1,0} all-gather(%y), replica_groups=mesh['data'=2,'ring'=4] {'ring'}, dimensions={0}
  %ags = (bf16[2,16]{1,0}, bf16[8,16]{1,0}) all-gather-start(%y), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %rs = f32[2,16]{1,0} reduce-scatter(%z), replica_groups={}, dimensions={0}, to_apply=%add
  %c = f32[8]{0} conditional(%i, %u, %u), branch_computations={%branch_a, %branch_b}
}
"""


def test_collective_bytes_parser():
  got = collective_bytes(_HLO)
  assert got == {
      "collective-permute": 3 * 4 * 16 * 4,  # in a loop run 3 times, every device sends
      "all-to-all": 3 * (2 * 2 * 16 * 4) / 2,  # groups of 2: half the buffer leaves
      "all-gather": 2 * (8 * 16 * 2) * 3 / 4,  # sync and async forms, groups of 4
      "reduce-scatter": 2 * 16 * 4 * 7,  # empty groups: all 8 devices
      "all-reduce": 2 * 8 * 4 * 3 / 4,  # the costlier branch of the conditional
  }


LLAMA3_8B = dict(num_heads=32, num_kv_heads=8, head_dim=128)


def test_ulysses_bytes_shrink_with_devices_and_ring_bytes_do_not():
  """USP paper, Table 1: per-device all-to-all traffic falls as 1/P, the ring's stays ~S."""
  shape = cm.AttentionShape(batch=1, seq_len=1 << 17, num_heads=32, num_kv_heads=32, head_dim=128)
  uly = [sum(cm.comm_bytes("ulysses", shape, 1, p, backward=True).values()) for p in (8, 16)]
  ring = [sum(cm.comm_bytes("ring", shape, p, 1, backward=True).values()) for p in (8, 16)]
  assert uly[0] / uly[1] == pytest.approx((7 / 8**2) / (15 / 16**2), rel=1e-3)  # (P-1)/P^2
  assert ring[1] / ring[0] == pytest.approx(1, abs=0.1)


def test_memory_and_feasibility():
  shape = cm.AttentionShape(batch=1, seq_len=1 << 20, **LLAMA3_8B)
  gather = cm.activation_bytes("allgather", shape, 8, 8)
  assert gather > 4 * cm.activation_bytes("usp", shape, 8, 8)  # full K/V on every device
  assert not cm.feasible("ulysses", shape, 8, 8)  # 32 heads over 64 devices
  assert cm.feasible("usp", shape, 8, 4) and cm.feasible("allgather", shape, 64, 1)
  with pytest.raises(ValueError, match="no strategy fits .* GiB"):
    cm.choose_strategy(shape, 8, 1, memory_budget=2**20)


def test_chooser_prefers_gather_or_ulysses_when_short_and_the_ring_when_long():
  short = cm.AttentionShape(batch=1, seq_len=4096, **LLAMA3_8B)
  long = cm.AttentionShape(batch=1, seq_len=1 << 20, **LLAMA3_8B)
  assert cm.choose_strategy(short, 8, 1).strategy in ("allgather", "ulysses")
  assert cm.choose_strategy(long, 8, 1).strategy in ("ring", "usp")
  fastest = cm.table(long, 64)[0]
  assert (fastest.strategy, fastest.ulysses) == ("usp", 1) or fastest.ring > 1
