"""The Llama-family transformer: embedding, levels of scanned pre-norm blocks, final norm, LM head.

A level is a stack of identical blocks whose parameters carry a leading `layers` dimension and
run with `jax.lax.scan`, so a DiPaCo path is one module per level and swapping a module is
swapping one stacked parameter tree.
"""
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lcjax import mesh as mesh_lib
from lcjax.model.attention import Attention
from lcjax.model.config import ModelConfig
from lcjax.model.layers import Embed, Mlp, Param, RMSNorm, _init
from lcjax.model import mst

LAYER_INPUT = "layer_input"

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Block inputs (the only thing `full` keeps) go to host memory; the rest is recomputed.
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[LAYER_INPUT],
        offload_src="device", offload_dst="pinned_host"),
}


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps)
    self.mlp = Mlp(cfg, rngs)
    self.mlp_chunks = cfg.mlp_chunks

  def __call__(self, x_BTE, positions_BT, segment_ids_BT):
    return self.prefill(x_BTE, positions_BT, segment_ids_BT)[0]

  def prefill(self, x_BTE, positions_BT, segment_ids_BT):
    """(output [B, T, E], (k, v) [B, T, K, D]); training drops the keys and values (and XLA
    with them), the KV-cache decoder keeps them."""
    # Pin the scan carry's layout at entry too: otherwise its cotangent inherits the fsdp
    # sharding of the weights and XLA regathers it in every backward step.
    x_BTE = checkpoint_name(mesh_lib.constrain(x_BTE, ("batch", "seq", "act_embed")), LAYER_INPUT)
    attn_BTE, kv = self.attn.attend(self.attn_norm(x_BTE), positions_BT, segment_ids_BT)
    x_BTE = x_BTE + attn_BTE
    x_BTE = x_BTE + mst.chunked_mlp(lambda x: self.mlp(self.mlp_norm(x)), x_BTE, self.mlp_chunks)
    return mesh_lib.constrain(x_BTE, ("batch", "seq", "act_embed")), kv


class Level(nnx.Module):
  """`layers_per_level` blocks with stacked parameters, applied by a scan."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=cfg.layers_per_level)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return Block(cfg, rngs)

    self.blocks = make_blocks(rngs)
    self.remat = cfg.remat

  def __call__(self, x_BTE, positions_BT, segment_ids_BT):
    graphdef, stacked = nnx.split(self.blocks)

    def body(x, layer_params):
      return nnx.merge(graphdef, layer_params)(x, positions_BT, segment_ids_BT), None

    if self.remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
    x_BTE, _ = jax.lax.scan(body, x_BTE, stacked)
    return x_BTE


class Transformer(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(cfg, rngs)
    self.levels = nnx.List([Level(cfg, rngs) for _ in range(cfg.num_levels)])
    self.final_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps)
    if not cfg.tie_embeddings:
      self.lm_head = Param(_init(rngs, (cfg.embed_dim, cfg.vocab_size), (0,)),
                               logical_axes=("embed", "vocab"))

  def hidden(self, tokens_BT, positions_BT, segment_ids_BT):
    """Final-normed hidden states [B, T, E] in the compute dtype."""
    x_BTE = mesh_lib.constrain(self.embed(tokens_BT), ("batch", "seq", "act_embed"))
    for level in self.levels:
      x_BTE = level(x_BTE, positions_BT, segment_ids_BT)
    return self.final_norm(x_BTE)

  def head_weight_EV(self):
    """The LM head as [E, V] float32 (the transposed embedding when tied)."""
    if self.cfg.tie_embeddings:
      return self.embed.embedding[...].T
    return self.lm_head[...]

  def __call__(self, tokens_BT, positions_BT, segment_ids_BT):
    """Logits [B, T, V] in float32."""
    h_BTE = self.hidden(tokens_BT, positions_BT, segment_ids_BT)
    return h_BTE.astype(jnp.float32) @ self.head_weight_EV()

  def loss_sums(self, batch):
    """(objective sum, cross-entropy sum, token count) over loss-masked tokens, float32;
    the objective adds the z-loss. See mst.loss_sums."""
    h_BTE = self.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
    return mst.loss_sums(h_BTE, self.head_weight_EV(), batch["targets"], batch["loss_mask"],
                         num_chunks=self.cfg.loss_chunks, z_loss=self.cfg.z_loss)

  def token_losses(self, batch):
    """Cross-entropy [B, T] float32 of every target, the loss mask not applied (evaluation)."""
    h_BTE = self.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
    return mst.token_losses(h_BTE, self.head_weight_EV(), batch["targets"],
                            num_chunks=self.cfg.loss_chunks)
