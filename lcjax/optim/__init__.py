"""Optimizers: AdamW or SGD with warmup + cosine, global-norm clipping, decoupled weight decay."""
import jax
import optax


def schedule(train_config) -> optax.Schedule:
  t = train_config
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup_steps,
      decay_steps=max(t.steps, t.warmup_steps + 1), end_value=t.lr * t.end_lr_fraction)


def decay_mask(params):
  """Weight decay on weight matrices and embeddings, not on norm scales."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key != "scale", params)


def make(config) -> optax.GradientTransformation:
  o, lr = config.optim, schedule(config.train)
  parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
  if o.name == "adamw":
    parts.append(optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=decay_mask))
  elif o.name == "sgd":
    parts.append(optax.add_decayed_weights(o.weight_decay, mask=decay_mask))
    parts.append(optax.sgd(lr, momentum=o.momentum or None))
  else:
    raise ValueError(f"optim.name must be adamw or sgd; got {o.name!r}")
  return optax.chain(*parts)
