"""`ops.attention`: dispatch, validation, and the ring-attention contract (local blocks, LSE)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_cases import Case, make_inputs, rel_err
from lcjax import ops
from lcjax.ops.attention import resolve_implementation
from lcjax.ops.reference import reference_attention


def test_auto_and_pallas_resolve_on_cpu():
  assert resolve_implementation("auto") == "xla"
  assert resolve_implementation("pallas") == "pallas_interpret"


@pytest.mark.parametrize("implementation",  # cudnn (GPU only): tests/test_cudnn_attention.py
                         [i for i in ops.IMPLEMENTATIONS if i != "cudnn"])
def test_every_implementation_through_public_api(implementation):
  (q, k, v), kw = make_inputs(Case(Tq=70, Tk=70, H=6, K=2, causal=True, segments=True))
  out, lse = ops.attention(q, k, v, return_lse=True, implementation=implementation, **kw)
  only_out = ops.attention(q, k, v, implementation=implementation, **kw)
  ref_out, ref_lse = reference_attention(q, k, v, return_lse=True, **dict(kw, scale=0.25))
  assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (2, 6, 70)
  assert lse.dtype == jnp.float32
  np.testing.assert_allclose(out, ref_out, atol=2e-5)
  np.testing.assert_allclose(only_out, out, atol=1e-6)
  np.testing.assert_allclose(lse, ref_lse, atol=2e-5)


def _ring_blocks():
  """A causal query chunk and three kv chunks (before, same, after), with documents and a window."""
  case = Case(Tq=96, Tk=288, H=6, K=2, causal=True, segments=True, empty_rows=True, window=150,
              q_offset=96)
  (q, k, v), kw = make_inputs(case)
  return (q, k, v), kw, [slice(0, 96), slice(96, 192), slice(192, 288)]


def _merge(parts):
  """Ring merge of (out, lse) partials in float32: exact softmax over the union of key sets."""
  lse = jnp.logaddexp(jnp.logaddexp(parts[0][1], parts[1][1]), parts[2][1])
  safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  out = sum(o.astype(jnp.float32) * jnp.exp(jnp.where(jnp.isfinite(l), l - safe, -jnp.inf)
                                              ).transpose(0, 2, 1)[..., None]
            for o, l in parts)
  return out, lse


@pytest.mark.parametrize("implementation", ["xla", "pallas_interpret"])
def test_ring_style_local_blocks_with_lse_gradients(implementation):
  """Local blocks with global positions merged through the LSE equal full attention, forward and
  backward; a block in the future is all empty rows (out 0, lse -inf) and its grads are finite."""
  (q, k, v), kw, chunks = _ring_blocks()

  @jax.jit
  def ring(q, k, v, kv_pos, kv_seg, q_pos, q_seg):
    parts = [ops.attention(q, k[:, c], v[:, c], causal=True, sliding_window=150,
                           q_positions=q_pos, kv_positions=kv_pos[:, c], q_segment_ids=q_seg,
                           kv_segment_ids=kv_seg[:, c], return_lse=True,
                           implementation=implementation) for c in chunks]
    return _merge(parts), parts[2]

  ids = (kw["kv_positions"], kw["kv_segment_ids"], kw["q_positions"], kw["q_segment_ids"])
  ((out, lse), (future_out, future_lse)), vjp = jax.vjp(
      lambda q, k, v: ring(q, k, v, *ids), q, k, v)
  np.testing.assert_array_equal(future_out, 0.0)
  assert np.isneginf(future_lse).all()
  rng = np.random.default_rng(3)
  cot = [rng.standard_normal(x.shape).astype(np.float32) for x in (out, lse, future_out, future_lse)]
  grads = vjp(((cot[0], cot[1]), (cot[2], cot[3])))
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()

  full = dict(kw, scale=16 ** -0.5)
  with jax.enable_x64(True):
    args = [np.asarray(x, np.float64) for x in (q, k, v)]
    (rout, rlse), rvjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, return_lse=True,
                                                                    **full), *args)
    rgrads = rvjp((cot[0].astype(np.float64), cot[1].astype(np.float64)))
  assert rel_err(out, rout) < 2e-5 and rel_err(lse, rlse) < 2e-5
  for g, r in zip(grads, rgrads):
    assert rel_err(g, r) < 1e-4


def test_empty_block_zero_gradients_under_lse_cotangent():
  """Every row empty: a nonzero cotangent on lse = -inf gives exactly zero gradients."""
  (q, k, v), kw = make_inputs(Case(Tq=40, Tk=50, causal=True, q_offset=-100))
  for implementation in ("xla", "pallas_interpret"):
    f = lambda q, k, v: ops.attention(q, k, v, return_lse=True, implementation=implementation,
                                      **kw)
    (out, lse), vjp = jax.vjp(f, q, k, v)
    assert np.isneginf(lse).all() and not np.asarray(out).any()
    for g in vjp((jnp.ones_like(out), jnp.ones_like(lse))):
      np.testing.assert_array_equal(g, 0.0)


def _bad_inputs():
  (q, k, v), kw = make_inputs(Case(Tq=8, Tk=8, H=6, K=2, D=8))
  pos = kw["q_positions"]
  return [
      ("multiple of kv heads", (q[:, :, :5], k, v), {}),
      ("same shape", (q, k, v[:, :7]), {}),
      ("batch and head dim", (q, k[:, :, :, :4], v[:, :, :, :4]), {}),
      ("expects q", (q[0], k, v), {}),
      ("floating dtype", (q.astype(np.int32), k.astype(np.int32), v.astype(np.int32)), {}),
      ("share a dtype", (q, k.astype(np.float16), v), {}),
      ("sliding_window must be a Python int >= 1", (q, k, v), dict(sliding_window=0)),
      ("sliding_window must be a Python int >= 1", (q, k, v), dict(sliding_window=-3)),
      ("softcap must be a Python number > 0", (q, k, v), dict(softcap=0.0)),
      ("scale must be a Python number", (q, k, v), dict(scale="big")),
      ("at least one query", (q[:, :0], k, v), {}),
      ("both q_segment_ids", (q, k, v), dict(q_segment_ids=pos)),
      ("q_positions must have shape", (q, k, v), dict(q_positions=pos[:, :5])),
      ("kv_segment_ids must have shape", (q, k, v),
       dict(q_segment_ids=pos, kv_segment_ids=pos[0])),
      ("integer dtype", (q, k, v), dict(q_positions=pos.astype(np.float32))),
      ("unknown attention implementation", (q, k, v), dict(implementation="flash")),
  ]


@pytest.mark.parametrize("message,args,kw", _bad_inputs(), ids=lambda x: x if isinstance(x, str) else "")
def test_invalid_inputs_raise(message, args, kw):
  with pytest.raises(ValueError, match=message):
    ops.attention(*args, **kw)


def test_traced_window_is_rejected_early():
  (q, k, v), _ = make_inputs(Case(Tq=8, Tk=8, D=8))
  with pytest.raises(ValueError, match="Python int"):
    jax.jit(lambda w: ops.attention(q, k, v, sliding_window=w))(3)
