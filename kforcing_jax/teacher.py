"""The AR teacher as a training `Task`: next-token cross-entropy."""

import jax.numpy as jnp
import optax

from kforcing_jax import model as model_lib
from kforcing_jax import train as train_lib

TEACHER = 'teacher'


def next_token_losses(logits_BxLxV, tokens_BxL):
  """Per-position cross-entropy of predicting tokens[:, 1:]."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV[:, :-1].astype(jnp.float32), tokens_BxL[:, 1:])


def teacher_task(config) -> train_lib.Task:
  cfg = model_lib.ModelConfig.from_config(config.model)
  model = model_lib.Transformer(cfg)

  def loss_fn(params, batch, extras, rng, frozen):
    del extras, frozen
    logits = model.apply({'params': params}, batch, deterministic=False,
                         rngs={'dropout': rng})
    losses = next_token_losses(logits, batch)
    acc = (logits[:, :-1].argmax(-1) == batch[:, 1:]).mean()
    return losses.mean(), {'accuracy': acc}

  def eval_fn(params, batch, frozen):
    del frozen
    losses = next_token_losses(model.apply({'params': params}, batch), batch)
    return {'loss': (losses.sum(), losses.size)}

  return train_lib.Task(
      name=TEACHER, model_cfg=cfg,
      init_params=lambda rng: model_lib.init_params(cfg, rng),
      loss_fn=loss_fn, eval_fn=eval_fn)
