"""Pure-JAX attention and sequence-parallel ops (no Flax, no configs).

Dimension letters used in names across lcjax: B batch, T local sequence, S global
sequence, H query heads, K kv heads, D head dim, E model width, F MLP width, V vocab,
L layers, R replicas, P paths. `q_BTHD` is a query array of shape [B, T, H, D].
"""
from lcjax.ops.attention import attention, IMPLEMENTATIONS
from lcjax.ops.reference import reference_attention
from lcjax.ops.attention import resolve_implementation
from lcjax.ops.blockwise import blockwise_attention
from lcjax.ops.pallas_attention import pallas_attention
from lcjax.ops.tiles import BlockSizes
from lcjax.ops.layouts import sequence_layout, inverse_layout
from lcjax.ops.sequence_parallel import sequence_parallel_attention, check_sequence_parallel
from lcjax.ops import cost_model
