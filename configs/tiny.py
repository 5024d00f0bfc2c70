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
  # train-evaluator in seconds too, and under one epoch of the 12 documents
  # (the base recipe's 1000 steps learnt them by heart: held-out ppl far
  # above its value at init).
  et = c.evaluator_train
  et.vocab_size, et.seq_len = 512, 64
  et.num_layers, et.d_model, et.num_heads = 1, 64, 4
  et.batch_size, et.num_steps, et.warmup_steps = 8, 60, 5
  et.eval_batches, et.log_every = 2, 20
  return c
