"""Smallest config that runs every command end to end (tests); a training
command takes seconds, the whole pipeline a few minutes on 2 CPU cores."""

from kforcing_jax import defaults


def get_config():
  c = defaults.base_config()
  c.name = 'tiny'
  c.model.vocab_size = 512
  c.model.seq_len = 32
  c.model.num_layers = 2
  c.model.d_model = 64
  c.model.num_heads = 4
  c.model.mlp_dim = 128
  c.data.max_documents = 12
  c.train.batch_size = 8
  c.train.num_steps = 40
  c.train.lr = 3e-3
  c.train.warmup_steps = 5
  c.train.log_every = 5
  c.train.eval_every = 20
  c.train.eval_batches = 2
  c.train.checkpoint_every = 20
  c.distill.eval_batches = 2
  c.decode.max_new_tokens = 16
  return c
