"""Paper setup, OpenWebText: 12 layers, width 768, 12 heads, length 1024,
GPT-2 vocabulary (50257).

Needs an array_record build of OpenWebText and GPT-2's tokenizer.json:
  --config.data.tfds_data_dir=$DATA --config.data.tokenizer_path=PATH/tokenizer.json
TFDS ships no openwebtext builder: write one named `openwebtext` with a `text`
feature (or set --config.data.tfds_name to yours) and build it with
`tfds build ... --file_format=array_record --data_dir=$DATA`.
"""

from kforcing_jax import defaults


def get_config():
  c = defaults.base_config()
  c.name = 'owt'
  c.model.vocab_size = 50257
  c.model.seq_len = 1024
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
  c.data.tfds_name = 'openwebtext'
  c.data.train_split = 'train[:99%]'
  c.data.eval_split = 'train[99%:]'
  c.train.batch_size = 512
  c.train.num_steps = 1_000_000
  c.train.lr = 3e-4
  c.train.warmup_steps = 2500
  c.train.schedule = 'constant'
  c.train.ema_decay = 0.9999
  c.train.eval_every = 10_000
  c.train.eval_batches = 16
  c.train.checkpoint_every = 10_000
  c.mesh.fsdp = True
  # Distillation: the authors' LM1B student recipe, batch 512, lr 1e-4, EMA
  # 0.999 (docs/METHOD.md), with our steps, warm-up and windows.
  defaults.paper_distill_recipe(c)
  c.decode.max_new_tokens = 1018
  return c
