"""Paper setup, LM1B: 12 layers, width 768, 12 heads, length 128,
bert-base-uncased vocabulary (30522).

Needs the array_record build of lm1b and the tokenizer file on local disk:
  tfds build lm1b --file_format=array_record --data_dir=$DATA  (needs TF once)
  --config.data.tfds_data_dir=$DATA --config.data.tokenizer_path=PATH/tokenizer.json
"""

from kforcing_jax import defaults


def get_config():
  c = defaults.base_config()
  c.name = 'lm1b'
  c.model.vocab_size = 30522
  c.model.seq_len = 128
  c.model.num_layers = 12
  c.model.d_model = 768
  c.model.num_heads = 12
  c.model.mlp_dim = 3072
  c.model.dropout_rate = 0.1
  c.model.dtype = 'bfloat16'
  # The paper's noise encoder at width 768: ~5.9M parameters.
  c.model.noise_feature_dim = 768
  c.model.noise_mlp_dim = 3072
  c.data.source = 'tfds'
  c.data.tfds_name = 'lm1b'
  c.data.eval_split = 'test'  # lm1b ships train and test only.
  c.train.batch_size = 512
  c.train.num_steps = 1_000_000
  c.train.lr = 3e-4
  c.train.warmup_steps = 2500
  c.train.schedule = 'constant'
  c.train.ema_decay = 0.9999
  c.train.eval_every = 10_000
  c.train.eval_batches = 64
  c.train.checkpoint_every = 10_000
  c.mesh.fsdp = True
  # Distillation: the authors' LM1B student recipe, batch 512, lr 1e-4, EMA
  # 0.999 (docs/METHOD.md), with our steps, warm-up and windows.
  defaults.paper_distill_recipe(c)
  c.decode.max_new_tokens = 122  # 6-token prefixes completed to 128.
  return c
