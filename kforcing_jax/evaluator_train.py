"""An independent evaluator LM trained offline: GPT-2 shape, torch, own BPE.

The paper scores samples with GPT-2 Large. Without internet access there is
no such model here, so `train-evaluator` trains a small GPT-2-shaped causal LM
locally and saves it (`save_pretrained`: model + tokenizer) where
`eval.evaluator` can point. It is independent of the K-Forcing models in
architecture (learned positions, tied embeddings), tokenizer (byte-level BPE,
not the project's SentencePiece), framework (torch, not JAX) and seed, but not
in data: it reads the same training split.

Recipe (`config.evaluator_train`): byte-level BPE trained on the train split;
documents + <|endoftext|> concatenated and cut into seq_len windows (the
project's concat-then-chunk); AdamW with linear warm-up then cosine decay to
10%; batches from a seeded permutation per epoch. Same seed and thread count,
same loss stream. Held-out perplexity is measured on the first
eval_batches * batch_size windows of data.eval_split, at init and at the end.

The output folder (default W/evaluator) is written to a temp folder and
renamed into place when complete: config.json and the weights, the tokenizer
files, metrics.jsonl (one row per log step) and train_info.json. A folder
with train_info.json is finished; running again skips it, unless it was
trained on other data (train_info.json records the data as data.json does).
"""

import dataclasses
import io
import json
import math
import os
import shutil
import tempfile
import time

import numpy as np

from kforcing_jax import data as data_lib
from kforcing_jax import defaults
from kforcing_jax import data_record
from kforcing_jax import documents
from kforcing_jax import hf_evaluator
from kforcing_jax import sharding
from kforcing_jax import torch_threads

_show = sharding.print_once  # Once per run, not once per process.

DIR_NAME = 'evaluator'
INFO_FILE = 'train_info.json'
METRICS_FILE = 'metrics.jsonl'
EOS = '<|endoftext|>'
_MIN_VOCAB = 257  # 256 byte symbols + EOS.


@dataclasses.dataclass(frozen=True)
class EvaluatorSettings:
  """The `evaluator_train` config section (see defaults.py), checked."""
  enabled: bool
  dir: str
  vocab_size: int
  seq_len: int
  num_layers: int
  d_model: int
  num_heads: int
  mlp_dim: int
  dropout: float
  batch_size: int
  num_steps: int
  lr: float
  warmup_steps: int
  weight_decay: float
  grad_clip: float
  eval_batches: int
  log_every: int
  seed: int
  num_threads: int

  def recipe(self) -> dict:
    """Fields that change the trained model or its measured held-out
    perplexity (eval_batches), not where it goes; saved in train_info.json."""
    out = dataclasses.asdict(self)
    for key in ('enabled', 'dir', 'log_every', 'num_threads'):
      out.pop(key)
    return out


def _check(s: EvaluatorSettings) -> None:
  """Raises ValueError naming the first bad field."""
  def bad(name, why):
    raise ValueError(f'evaluator_train.{name}={getattr(s, name)!r} {why}')
  if s.vocab_size < _MIN_VOCAB:
    bad('vocab_size', f'must be >= {_MIN_VOCAB} (256 bytes + {EOS})')
  if s.seq_len < 2:
    bad('seq_len', 'must be >= 2 (next-token prediction)')
  for name in ('num_layers', 'd_model', 'num_heads', 'batch_size',
               'num_steps', 'eval_batches', 'log_every'):
    if getattr(s, name) < 1:
      bad(name, 'must be >= 1')
  if s.d_model % s.num_heads:
    bad('num_heads', f'must divide d_model={s.d_model}')
  for name in ('mlp_dim', 'warmup_steps', 'weight_decay', 'grad_clip',
               'num_threads'):
    if not getattr(s, name) >= 0:
      bad(name, 'must be >= 0')
  if not 0 <= s.dropout < 1:
    bad('dropout', 'not in [0, 1)')
  if not s.lr > 0:
    bad('lr', 'must be > 0')


def evaluator_settings(config) -> EvaluatorSettings:
  """Reads `config.evaluator_train`; absent fields take base_config values.

  Raises:
    ValueError: A field is out of range (the message names it).
  """
  base = defaults.base_config().evaluator_train
  section = config.get('evaluator_train', None) or {}
  raw = {k: section.get(k, v) for k, v in base.items()}
  s = EvaluatorSettings(**{
      f.name: f.type(raw[f.name]) for f in dataclasses.fields(
          EvaluatorSettings)})
  _check(s)
  return s


def output_dir(config, workdir: str) -> str:
  return evaluator_settings(config).dir or os.path.join(workdir, DIR_NAME)


def is_complete(path: str) -> bool:
  return os.path.isfile(os.path.join(path, INFO_FILE))


# --------------------------------------------------------------------------
# Data and tokenizer.
# --------------------------------------------------------------------------


def train_tokenizer(texts, vocab_size: int):
  """A byte-level BPE `tokenizers.Tokenizer` (GPT-2 style), EOS id 0."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
      add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
      # Every byte is a symbol: any text encodes, nothing is unknown.
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  return tok


def _windows(tok, texts, seq_len: int) -> np.ndarray:
  """(n, seq_len) int64: the project's concat-then-chunk, with our EOS."""
  ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
  chunks = data_lib.concat_then_chunk(ids, tok.token_to_id(EOS), seq_len)
  return chunks.astype(np.int64)


def _split_windows(tok, texts, split: str, seq_len: int) -> np.ndarray:
  chunks = _windows(tok, texts, seq_len)
  if not len(chunks):  # pylint: disable=g-explicit-length-test
    raise ValueError(f'split {split!r} is shorter than one evaluator window '
                     f'of evaluator_train.seq_len={seq_len} tokens')
  return chunks


def batch_indices(num_windows: int, batch_size: int, num_steps: int,
                  seed: int):
  """Row indices of every step: a fresh seeded permutation per epoch."""
  rng = np.random.default_rng(seed)
  need = batch_size * num_steps
  order = [rng.permutation(num_windows)
           for _ in range(-(-need // num_windows))]
  return np.concatenate(order)[:need].reshape(num_steps, batch_size)


# --------------------------------------------------------------------------
# Model and training.
# --------------------------------------------------------------------------


def build_model(transformers, s: EvaluatorSettings, vocab_size: int,
                eos_id: int):
  """A randomly initialised GPT2LMHeadModel of the settings' shape."""
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=vocab_size, n_positions=s.seq_len, n_embd=s.d_model,
      n_layer=s.num_layers, n_head=s.num_heads, n_inner=s.mlp_dim or None,
      # Exact GELU is one fused CPU kernel; GPT-2's tanh form is eight.
      activation_function='gelu',
      resid_pdrop=s.dropout, embd_pdrop=s.dropout, attn_pdrop=s.dropout,
      bos_token_id=eos_id, eos_token_id=eos_id))
  # The class name does not tell transformers which loss; say it (no warning).
  model.loss_type = 'ForCausalLM'
  return model


def _optimizer(torch, model, s: EvaluatorSettings):
  """AdamW; matrices decay, biases and norm scales do not."""
  params = [p for p in model.parameters() if p.requires_grad]
  groups = [{'params': [p for p in params if p.dim() >= 2],
             'weight_decay': s.weight_decay},
            {'params': [p for p in params if p.dim() < 2],
             'weight_decay': 0.0}]
  opt = torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95), fused=True)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(
      step, s.warmup_steps, s.num_steps))
  return opt, sched


def lr_factor(step: int, warmup: int, total: int) -> float:
  """Linear warm-up to 1, then cosine decay to 0.1 at `total`."""
  if step < warmup:
    return (step + 1) / warmup
  frac = min(1.0, (step - warmup) / max(1, total - warmup))
  return 0.1 + 0.45 * (1.0 + math.cos(math.pi * frac))


def heldout_loss(torch, model, windows: np.ndarray, batch_size: int) -> float:
  """Mean next-token NLL (nats) over every predicted token of `windows`."""
  model.eval()
  total, count = 0.0, 0
  with torch.no_grad():
    for lo in range(0, len(windows), batch_size):
      x = torch.from_numpy(windows[lo:lo + batch_size])
      loss = model(input_ids=x, labels=x).loss  # Mean over B * (T - 1).
      n = x.shape[0] * (x.shape[1] - 1)
      total, count = total + float(loss) * n, count + n
  model.train()
  return total / count


def _train_loop(torch, model, train_windows, s: EvaluatorSettings, metrics):
  """AdamW steps; writes log rows to `metrics`; returns the last row."""
  opt, sched = _optimizer(torch, model, s)
  steps = batch_indices(len(train_windows), s.batch_size, s.num_steps,
                        s.seed)
  model.train()
  t0, run_loss, run_n, row = time.perf_counter(), 0.0, 0, {}
  for step, idx in enumerate(steps, start=1):
    x = torch.from_numpy(train_windows[idx])
    loss = model(input_ids=x, labels=x).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if s.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
    opt.step()
    lr = sched.get_last_lr()[0]  # This step's: sched.step() sets the next.
    sched.step()
    run_loss, run_n = run_loss + loss.item(), run_n + 1
    if step % s.log_every == 0 or step == s.num_steps:
      dt = time.perf_counter() - t0
      row = {'step': step, 'loss': run_loss / run_n,
             'lr': lr,
             'tokens_per_s': step * x.numel() / max(dt, 1e-9)}
      metrics.write(json.dumps(row) + '\n')
      _show(f"[evaluator] step {step}/{s.num_steps}: loss {row['loss']:.4f}, "
            f"lr {row['lr']:.2e}, {row['tokens_per_s']:,.0f} tok/s",
            flush=True)
      run_loss, run_n = 0.0, 0
  row['seconds'] = time.perf_counter() - t0
  return row


# --------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------


def check_output_dir(config, out: str) -> None:
  """Refuses `out` unless it is free or a finished evaluator of `config`'s
  data. A folder that is there but unfinished is not ours: never delete
  it."""
  if is_complete(out):
    _check_finished_data(config, out)
  elif os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ValueError(
        f'{out} exists but is not a finished evaluator (no {INFO_FILE}); '
        'delete it or set evaluator_train.dir to another folder')


def _read_info(out: str) -> dict:
  with open(os.path.join(out, INFO_FILE)) as f:
    return json.load(f)


def _check_finished_data(config, out: str) -> None:
  """Refuses a finished evaluator trained on other data than `config`'s.

  The default folder sits in the workdir, whose data.json the commands
  check; one set by `evaluator_train.dir` may be shared between workdirs,
  and would score this corpus's samples as a model of another. A folder
  trained before the data was recorded is not checked.
  """
  then = _read_info(out).get('data')
  if then is None:
    return
  changed = data_record.differences(then, data_record.identity(config))
  if changed:
    raise ValueError(
        f'the evaluator in {out} was trained on other data: '
        f'{"; ".join(changed)}. Delete it or set evaluator_train.dir to '
        'another folder to train one on this data; to score with it anyway, '
        'give it as eval.evaluator.')


def overfit_warning(info: dict) -> str | None:
  """A warning (train_info.json `info`) when training made held-out text
  less likely than the untrained model found it: the evaluator learnt its
  train windows by heart, and would score samples as such a model."""
  ppl, init = info.get('heldout_ppl'), info.get('init_heldout_ppl')
  if ppl is None or init is None or not ppl > init:
    return None
  windows = info.get('train_windows') or 0
  rows = (info.get('steps') or 0) * (info.get('recipe') or {}).get(
      'batch_size', 0)
  epochs = (f', {rows / windows:.0f} epochs of its {windows} train windows'
            if windows and rows else '')
  return (f'WARNING: held-out ppl {ppl:.1f} is above its {init:.1f} at '
          f'init: it overfit the train split{epochs}. Its scores say '
          'little; train it with fewer evaluator_train.num_steps or on more '
          'data')


def _show_overfit_warning(info: dict) -> None:
  warning = overfit_warning(info)
  if warning:
    _show(f'[evaluator] {warning}', flush=True)


def _report_skip(out: str, s: EvaluatorSettings) -> None:
  info = _read_info(out)
  _show(f'[evaluator] {out} is complete (held-out ppl '
        f"{info.get('heldout_ppl', float('nan')):.1f}): skipped training",
        flush=True)
  _show_overfit_warning(info)
  # eval_batches only sizes the held-out measurement, not the model; it
  # stays in recipe() (saved) but is not a reason to say "retrain".
  model_fields = lambda r: {k: v for k, v in (r or {}).items()
                            if k != 'eval_batches'}
  if model_fields(info.get('recipe')) != model_fields(s.recipe()):
    _show(f'[evaluator] note: it was trained with other evaluator_train '
          f'settings than these; delete {out} to retrain', flush=True)


def _save(out: str, model, fast_tokenizer, info: dict, metrics: str) -> None:
  """save_pretrained into a temp folder beside `out`, then one rename."""
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix='.tmp-evaluator-')
  try:
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide it from others.
    model.save_pretrained(tmp)
    fast_tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, METRICS_FILE), 'w') as f:
      f.write(metrics)
    with open(os.path.join(tmp, INFO_FILE), 'w') as f:  # Last: marks done.
      json.dump(info, f, indent=1)
    try:
      try:
        os.rmdir(out)  # Empty (checked before training)...
      except FileNotFoundError:  # (or another process removed it first)
        pass
      os.rename(tmp, out)
    except OSError:  # ...unless another process has saved there since.
      if not is_complete(out):  # Else another process finished first.
        raise
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _prepare_data(config, s: EvaluatorSettings):
  """(tokenizer, train windows, held-out windows) from the raw splits."""
  train_split, eval_split = config.data.train_split, config.data.eval_split
  # Both splits have documents: train_evaluator checked them up front.
  train_texts = documents.raw_texts(config, train_split)
  eval_texts = documents.raw_texts(config, eval_split)
  tok = train_tokenizer(train_texts, s.vocab_size)
  train_windows = _split_windows(tok, train_texts, train_split, s.seq_len)
  heldout = _split_windows(tok, eval_texts, eval_split, s.seq_len)
  return tok, train_windows, heldout[:s.eval_batches * s.batch_size]


def thread_count(s: EvaluatorSettings) -> int:
  """torch threads for training: num_threads, or (0) the cores this process
  may use, which a container or taskset can make fewer than os.cpu_count()."""
  return s.num_threads or torch_threads.usable_cpu_count()


def _fit(torch, transformers, s: EvaluatorSettings, tok, train_windows,
         heldout, metrics):
  """Builds and trains the model. Returns (model, train_info fields)."""
  with torch_threads.torch_threads(torch, thread_count(s)):
    torch.manual_seed(s.seed)
    model = build_model(transformers, s, tok.get_vocab_size(),
                        tok.token_to_id(EOS))
    params = sum(p.numel() for p in model.parameters())
    _show(f'[evaluator] GPT-2 shape, {params / 1e6:.2f}M parameters, vocab '
          f'{tok.get_vocab_size()}, {len(train_windows)} train windows of '
          f'{s.seq_len} tokens, {torch.get_num_threads()} threads', flush=True)
    init_loss = heldout_loss(torch, model, heldout, s.batch_size)
    last = _train_loop(torch, model, train_windows, s, metrics)
    loss = heldout_loss(torch, model, heldout, s.batch_size)
  return model, {
      'steps': s.num_steps, 'final_train_loss': last['loss'],
      'heldout_ppl': math.exp(loss), 'init_heldout_ppl': math.exp(init_loss),
      'heldout_tokens': int(heldout.shape[0] * (heldout.shape[1] - 1)),
      'train_seconds': last['seconds'], 'tokens_per_s': last['tokens_per_s'],
      'params': int(params), 'vocab_size': tok.get_vocab_size(),
      'train_windows': int(len(train_windows))}


def train_evaluator(config, workdir: str) -> str:
  """Trains (or finds) the independent evaluator; returns its folder.

  Args:
    config: Experiment config (data.*, evaluator_train.*).
    workdir: Run directory; the default output is `{workdir}/evaluator`.

  Returns:
    The folder, loadable by `hf_evaluator.load_evaluator` (`eval.evaluator`).

  Raises:
    ValueError: A bad evaluator_train field, an unfinished folder in the
      way or a finished one trained on other data (all before reading any
      data), or a split too short for one window.
    ImportError: torch or transformers missing (names the `eval` extra).
  """
  s = evaluator_settings(config)
  out = output_dir(config, workdir)
  check_output_dir(config, out)
  if is_complete(out):
    _report_skip(out, s)
    return out
  # The workdir's data, as every data-reading command checks it.
  splits = data_lib.training_splits(config, held_out=True)
  documents.check_splits(config, splits)
  data = data_record.check(config, workdir)
  for note in data_lib.training_text_notes(config, splits):
    _show(f'[evaluator] NOTE: {note}', flush=True)
  torch, transformers = hf_evaluator.import_transformers(
      'training the independent evaluator')
  t_start = time.perf_counter()
  tok, train_windows, heldout = _prepare_data(config, s)
  metrics = io.StringIO()  # metrics.jsonl, saved with the model.
  model, info = _fit(torch, transformers, s, tok, train_windows, heldout,
                     metrics)
  info.update({'heldout_split': config.data.eval_split,
               'seconds': time.perf_counter() - t_start, 'recipe': s.recipe(),
               'data': data,
               'torch': torch.__version__,
               'transformers': transformers.__version__})
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS,
      pad_token=EOS)
  _save(out, model, fast, info, metrics.getvalue())
  _show(f"[evaluator] held-out ppl {info['heldout_ppl']:.1f} (at init "
        f"{info['init_heldout_ppl']:.1f}), {info['seconds']:.0f} s; saved "
        f'{out}', flush=True)
  _show_overfit_warning(info)
  return out
