"""Sample-quality evaluation of the AR teacher and the K-Forcing students.

Protocol (the paper's): the first `eval.prefix_len` (6) tokens of held-out
sequences are completed to the model's `seq_len` by every model with ONE
shared noise array (seed `eval.seed`), so token n of sample i is decoded from
noise[i, n] by the teacher (inverse CDF, temperature 1) and by every student
(noise slot). Decoding is fixed-length: no early stop at eos (in the
concat-then-chunk stream eos only separates documents).

Models, in order: 'data' (the held-out continuations themselves, a
reference row with no decoding), 'teacher' (k=1), and 'student_k<k>' for
k in `eval.ks` (default 1..the largest trained window), each decoded by the
smallest trained student window >= k, plus 'student_k<k>_penalty' where
`eval.penalties[k]` > 0 (docs/METHOD.md's frequency penalty).

Metrics (all on the generated tokens only, prefix excluded; per sample, then
the mean over samples with a bootstrap CI):
  teacher_ppl     exp(mean NLL per generated token) under the AR teacher's
                  full causal forward over [prefix | generated].
  evaluator_ppl   the same under an independent HF causal LM
                  (`eval.evaluator`, a local path): samples are decoded to
                  text (each eos written as the evaluator's own eos token,
                  e.g. <|endoftext|>, as between its training documents)
                  and re-tokenised by the evaluator's tokenizer; the
                  scored tokens are the continuation, i.e. those after the
                  longest common token prefix of tokenize(prefix text) and
                  tokenize(full text). null when no evaluator is set.
  entropy         unigram entropy (nats) of each sample's generated tokens.
  distinct_n      unique n-grams / total n-grams of each sample, n = 1..4.
  repetition_4    fraction of generated tokens covered by a 4-gram that
                  already occurred earlier in the same sample.
  coupling        students only, against the teacher's rollout from the same
                  prefix and noise: `agreement` (fraction of positions where
                  student token == teacher token), `per_slot[s]` (the same
                  over positions n with n % k == s) and `first_divergence`
                  (number of tokens before the first mismatch; the full length
                  when there is none); `noise_sweep` (unpenalised students
                  with eval.sweep_contexts > 0): slot 1's map against the
                  teacher's over a u grid at held-out contexts, see
                  noise_sweep.py.
Perplexity CIs resample samples and recompute exp(total NLL / total tokens).

eval.json schema (`validate_eval_json` checks it):
  {
    "schema_version": 1,
    "name": str,                       # config.name
    "settings": {"prefix_len": int, "max_new_tokens": int, "seq_len": int,
                 "num_samples": int, "batch_size": int, "seed": int,
                 "bootstrap": int, "ci_level": float, "split": str,
                 "evaluator": str, "evaluator_scope": "continuation"},
    "notes": [str, ...],
    "models": {
      NAME: {
        "kind": "data" | "teacher" | "student",
        "run": str | null,             # run directory name, e.g. student_k4
        "k": int, "penalty": float,
        "samples_file": str,           # relative: samples/NAME.jsonl
        "decode": null | {"seconds": float, "tokens_per_s": float,
                          "includes_compile": bool},
        "metrics": {"teacher_ppl": STAT, "evaluator_ppl": STAT | null,
                    "entropy": STAT, "distinct_1": STAT, ..., "distinct_4":
                    STAT, "repetition_4": STAT},
        "coupling": null | {"agreement": STAT, "per_slot": [STAT] * k,
                            "first_divergence": STAT,
                            "noise_sweep": null | SWEEP}  # optional key
      }, ...
    }
  }
  STAT = {"mean": float | null, "lo": float | null, "hi": float | null,
          "n": int}   # n samples contributing; null values when n == 0.
  SWEEP = noise_sweep.py's JSON form (STATs over contexts, not samples).

Each samples/NAME.jsonl line: {"index", "model", "k", "penalty", "prefix"
(text), "text" (prefix + continuation, decoded together), "prefix_ids",
"token_ids" (generated ids), "teacher_nll" (mean per token), "evaluator_nll"
(mean per token or null), "entropy"}.
"""

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import checkpoints
from kforcing_jax import data as data_lib
from kforcing_jax import decode
from kforcing_jax import files
from kforcing_jax import model as model_lib
from kforcing_jax import noise_sweep
from kforcing_jax import projection
from kforcing_jax import sharding
from kforcing_jax import token_stats

SCHEMA_VERSION = 1
NGRAM_ORDERS = (1, 2, 3, 4)
REPETITION_N = 4
EVAL_EXTRA_HINT = ("pip install 'kforcing_jax[eval]'  (or: pip install torch "
                   'transformers)')

# Defaults of the `eval` config section, used for fields a config lacks.
_DEFAULTS = {
    'num_samples': 256,
    'prefix_len': 6,
    'batch_size': 32,
    'seed': 0,
    'ks': (),
    'penalties': {'k2': 0.2, 'k3': 0.4, 'k4': 0.5},
    'evaluator': '',
    'evaluator_batch_size': 8,
    'bootstrap': 1000,
    'ci_level': 0.95,
    'split': '',
    'sweep_contexts': 32,
    'sweep_grid': 1024,
}


# --------------------------------------------------------------------------
# Settings.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """The `eval` config section, with defaults filled in and checked."""
  num_samples: int
  prefix_len: int
  batch_size: int
  seed: int
  ks: tuple[int, ...]  # Empty: 1..largest trained window.
  penalties: tuple[tuple[int, float], ...]  # (k, lambda) pairs.
  evaluator: str
  evaluator_batch_size: int
  bootstrap: int
  ci_level: float
  split: str  # '' means data.eval_split.
  sweep_contexts: int  # Held-out contexts of the noise sweep; 0: none.
  sweep_grid: int  # u grid points per swept context.

  def penalty(self, k: int) -> float:
    return dict(self.penalties).get(k, 0.0)


def _parse_penalties(raw) -> tuple[tuple[int, float], ...]:
  """Parses {k: lambda}; keys 'k2' (CLI-overridable), '2' or 2."""
  items = raw.items() if hasattr(raw, 'items') else raw
  out = []
  for key, lam in items:
    try:
      k = int(key[1:] if isinstance(key, str) and key[:1] == 'k' else key)
    except (TypeError, ValueError) as e:
      raise ValueError(f"eval.penalties key {key!r} is not a k (e.g. 'k2')"
                       ) from e
    if k < 1 or not 0 <= float(lam) < math.inf:
      raise ValueError(f'eval.penalties[{key!r}]={lam}: need k >= 1 and '
                       'a finite lambda >= 0')
    out.append((k, float(lam)))
  return tuple(sorted(out))


def eval_settings(config) -> EvalSettings:
  """Reads `config.eval` (missing fields take defaults); raises ValueError."""
  section = config.get('eval', None) or {}
  raw = {name: section.get(name, default)
         for name, default in _DEFAULTS.items()}
  s = EvalSettings(
      num_samples=int(raw['num_samples']), prefix_len=int(raw['prefix_len']),
      batch_size=int(raw['batch_size']), seed=int(raw['seed']),
      ks=tuple(int(k) for k in raw['ks']),
      penalties=_parse_penalties(raw['penalties']),
      evaluator=str(raw['evaluator']),
      evaluator_batch_size=int(raw['evaluator_batch_size']),
      bootstrap=int(raw['bootstrap']), ci_level=float(raw['ci_level']),
      split=str(raw['split']), sweep_contexts=int(raw['sweep_contexts']),
      sweep_grid=int(raw['sweep_grid']))
  for name in ('num_samples', 'prefix_len', 'batch_size',
               'evaluator_batch_size', 'sweep_grid'):
    if getattr(s, name) < 1:
      raise ValueError(f'eval.{name}={getattr(s, name)} must be >= 1')
  if s.bootstrap < 0:
    raise ValueError(f'eval.bootstrap={s.bootstrap} must be >= 0')
  if s.sweep_contexts < 0:
    raise ValueError(f'eval.sweep_contexts={s.sweep_contexts} must be >= 0 '
                     '(0 skips the noise sweep)')
  if not 0 < s.ci_level < 1:
    raise ValueError(f'eval.ci_level={s.ci_level} not in (0, 1)')
  if any(k < 1 for k in s.ks):
    raise ValueError(f'eval.ks={s.ks}: every k must be >= 1')
  if len(set(s.ks)) != len(s.ks):
    raise ValueError(f'eval.ks={s.ks}: each k once')
  return s


def check_evaluator_dir(path: str) -> None:
  """A local `save_pretrained` folder: a directory with a config.json."""
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f'eval.evaluator={path!r} is not a directory; point it at a local '
        'save_pretrained folder (model + tokenizer)')
  if not os.path.isfile(os.path.join(path, 'config.json')):
    raise ValueError(
        f'eval.evaluator={path!r} has no config.json, so it is not a '
        'Hugging Face save_pretrained folder (model + tokenizer)')


# --------------------------------------------------------------------------
# Bootstrap confidence intervals.
# --------------------------------------------------------------------------

# Bound on resamples * samples held in memory at once.
_BOOTSTRAP_BLOCK = 1 << 22


def bootstrap_ci(values, weights=None, *, num_resamples: int = 1000,
                 seed: int = 0, level: float = 0.95,
                 transform: Callable[[Any], Any] | None = None) -> dict:
  """Mean of per-sample values with a percentile-bootstrap CI.

  The statistic is transform(sum(w * v) / sum(w)) (plain mean when weights
  is None); each resample draws samples with replacement and recomputes it,
  so a perplexity is exp of a token-weighted mean NLL. Non-finite values and
  zero weights are dropped first (undefined for that sample).

  Args:
    values: (N,) per-sample values.
    weights: optional (N,) non-negative weights.
    num_resamples: bootstrap resamples; 0 gives lo = hi = mean.
    seed: seed of the resampling (same seed, same interval).
    level: coverage of the two-sided interval.
    transform: applied to the (resampled) weighted means, e.g. np.exp.
  Returns:
    {'mean', 'lo', 'hi', 'n'}: floats (None when no sample is usable) and
    the number of usable samples. Callers pass eval.seed everywhere, so all
    metrics of a run resample the same sets of samples.
  """
  v = np.asarray(values, np.float64).reshape(-1)
  w = (np.ones_like(v) if weights is None else
       np.asarray(weights, np.float64).reshape(-1))
  keep = np.isfinite(v) & np.isfinite(w) & (w > 0)
  v, w = v[keep], w[keep]
  n = len(v)
  if n == 0:
    return {'mean': None, 'lo': None, 'hi': None, 'n': 0}
  fn = transform or (lambda x: x)
  mean = float(fn(np.sum(v * w) / np.sum(w)))
  if num_resamples < 1 or n == 1:
    return {'mean': mean, 'lo': mean, 'hi': mean, 'n': n}
  rng = np.random.default_rng(seed)
  block = max(1, _BOOTSTRAP_BLOCK // n)
  stats = []
  for start in range(0, num_resamples, block):
    idx = rng.integers(0, n, (min(block, num_resamples - start), n))
    stats.append(fn(np.sum(v[idx] * w[idx], 1) / np.sum(w[idx], 1)))
  alpha = (1.0 - level) / 2
  lo, hi = np.quantile(np.concatenate(stats), [alpha, 1.0 - alpha])
  return {'mean': mean, 'lo': float(lo), 'hi': float(hi), 'n': n}


# --------------------------------------------------------------------------
# Per-sample text statistics (token ids of the generated part only).
# --------------------------------------------------------------------------


def _ngrams(tokens, n: int) -> list[tuple[int, ...]]:
  t = [int(x) for x in np.asarray(tokens).reshape(-1)]
  return [tuple(t[i:i + n]) for i in range(len(t) - n + 1)]


def distinct_n(tokens, n: int) -> float:
  """Unique n-grams / total n-grams of one sample; nan if shorter than n."""
  grams = _ngrams(tokens, n)
  return len(set(grams)) / len(grams) if grams else math.nan


def repetition_rate(tokens, n: int = REPETITION_N) -> float:
  """Fraction of tokens covered by an n-gram that occurred earlier.

  Token i counts as repeated when some occurrence x[j:j+n] with
  j <= i < j + n equals an n-gram starting at an earlier j' < j. A sample
  that loops is close to 1; one without repeated n-grams is 0.
  """
  grams = _ngrams(tokens, n)
  length = np.asarray(tokens).size
  if length == 0:
    return math.nan
  covered = np.zeros(length, bool)
  seen = set()
  for j, gram in enumerate(grams):
    if gram in seen:
      covered[j:j + n] = True
    seen.add(gram)
  return float(covered.mean())


def text_stats(tokens_NxT) -> dict[str, np.ndarray]:
  """Per-sample entropy, distinct-n and repetition arrays, each (N,)."""
  rows = np.asarray(tokens_NxT)
  out = {'entropy': np.array([token_stats.unigram_entropy(r) for r in rows])}
  for n in NGRAM_ORDERS:
    out[f'distinct_{n}'] = np.array([distinct_n(r, n) for r in rows])
  out[f'repetition_{REPETITION_N}'] = np.array(
      [repetition_rate(r) for r in rows])
  return out


def coupling_stats(student_NxT, teacher_NxT, k: int) -> dict[str, Any]:
  """Per-sample agreement of a student's tokens with the teacher's rollout.

  Returns:
    {'agreement': (N,) fraction of equal positions,
     'per_slot': (N, k) the same over positions n with n % k == s,
     'first_divergence': (N,) tokens before the first mismatch (T if none)}.
  """
  s, t = np.asarray(student_NxT), np.asarray(teacher_NxT)
  if s.shape != t.shape:
    raise ValueError(f'student tokens {s.shape} vs teacher {t.shape}')
  equal = s == t
  slots = np.arange(s.shape[1]) % k
  per_slot = np.stack([equal[:, slots == i].mean(1) if (slots == i).any()
                       else np.full(len(s), np.nan) for i in range(k)], 1)
  first = np.where(equal.all(1), s.shape[1], np.argmin(equal, axis=1))
  return {'agreement': equal.mean(1), 'per_slot': per_slot,
          'first_divergence': first.astype(np.float64)}


# --------------------------------------------------------------------------
# Likelihoods.
# --------------------------------------------------------------------------


def sequence_nll(logprob_fn, tokens_NxL, start: int, batch_size: int):
  """NLL of tokens[:, start:] given everything before them.

  Args:
    logprob_fn: (B, L) int tokens -> (B, L - 1) log p(tokens[:, j + 1] |
      tokens[:, :j + 1]), e.g. `teacher_logprob_fn`.
    tokens_NxL: the full sequences [prefix | generated].
    start: index of the first scored token (the prefix length, >= 1).
    batch_size: rows per call (the last batch is padded to this size so a
      jitted function compiles once).
  Returns:
    (nll_sum (N,), count (N,)) in float64 / int.
  """
  tokens = np.asarray(tokens_NxL)
  n, length = tokens.shape
  if not 1 <= start < length:
    raise ValueError(f'start={start} must be in [1, {length})')
  sums = []
  for lo in range(0, n, batch_size):
    rows = tokens[lo:lo + batch_size]
    lp = np.asarray(logprob_fn(_pad_rows(rows, batch_size)), np.float64)
    sums.append(-lp[:len(rows), start - 1:].sum(1))
  return np.concatenate(sums), np.full(n, length - start)


def teacher_logprob_fn(cfg: model_lib.ModelConfig, params):
  """`logprob_fn` of an AR model's full causal forward (temperature 1)."""
  model = model_lib.Transformer(cfg)

  @jax.jit
  def fn(p, tokens):
    logits = model.apply({'params': p}, tokens).astype(jnp.float32)
    lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]

  return lambda tokens: fn(params, jnp.asarray(tokens, jnp.int32))


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
  """Pads `a` to `rows` rows by repeating its first row."""
  if len(a) >= rows:
    return a
  return np.concatenate([a, np.repeat(a[:1], rows - len(a), axis=0)])


def perplexity_ci(nll_sum, count, s: EvalSettings) -> dict:
  """exp(total NLL / total tokens) with a bootstrap CI over samples."""
  count = np.asarray(count, np.float64)
  with np.errstate(invalid='ignore', divide='ignore'):
    per_token = np.asarray(nll_sum, np.float64) / count
  return bootstrap_ci(per_token, count, num_resamples=s.bootstrap,
                      seed=s.seed, level=s.ci_level, transform=np.exp)


# --------------------------------------------------------------------------
# Independent evaluator (HF transformers causal LM).
# --------------------------------------------------------------------------


def import_transformers(purpose: str = 'eval.evaluator is set'):
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'{purpose}, which needs the optional packages `torch` '
        f'and `transformers` (the `eval` extra): {EVAL_EXTRA_HINT}. '
        f'Import failed: {e}') from e
  return torch, transformers


def continuation_start(prefix_ids: Sequence[int],
                       full_ids: Sequence[int]) -> int:
  """Index of the first scored evaluator token: after the common prefix.

  Re-tokenising the full text may merge the prefix's last token with the
  continuation, so the boundary is the longest common token prefix; at least
  1, since the first token has no context.
  """
  i = 0
  while i < min(len(prefix_ids), len(full_ids)) and (
      prefix_ids[i] == full_ids[i]):
    i += 1
  return max(i, 1)


class HFEvaluator:
  """A causal LM from `transformers`, loaded from a local directory."""

  def __init__(self, path: str, batch_size: int = 8):
    check_evaluator_dir(path)
    torch, transformers = import_transformers()
    self._torch = torch
    self.path = path
    self.batch_size = batch_size
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(
        path, local_files_only=True)
    # float32 whatever the saved dtype: perplexities must not depend on it.
    self.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    self.model = transformers.AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True).float().to(self.device)
    self.model.eval()
    mc = self.model.config
    self.max_len = (getattr(mc, 'n_positions', None) or
                    getattr(mc, 'max_position_embeddings', None) or 1 << 30)

  @property
  def document_separator(self) -> str:
    """What stands for our eos in the text it scores: its own eos token
    (GPT-2's <|endoftext|>), as between documents in its training data."""
    return self.tokenizer.eos_token or '\n\n'

  def _ids(self, texts: Sequence[str]) -> list[list[int]]:
    return [list(self.tokenizer(t)['input_ids']) for t in texts]

  def token_spans(self, prefix_texts, texts):
    """(ids, start) per sample: evaluator ids (truncated), first scored."""
    out = []
    for p_ids, ids in zip(self._ids(prefix_texts), self._ids(texts)):
      ids = ids[:self.max_len]
      out.append((ids, min(continuation_start(p_ids, ids), len(ids))))
    return out

  def nll(self, prefix_texts: Sequence[str], texts: Sequence[str]):
    """(nll_sum (N,), count (N,)) of each text's continuation tokens."""
    spans = self.token_spans(prefix_texts, texts)
    sums = np.zeros(len(spans))
    counts = np.zeros(len(spans), np.int64)
    for lo in range(0, len(spans), self.batch_size):
      chunk = spans[lo:lo + self.batch_size]
      lp = self._logprobs([ids for ids, _ in chunk])
      for j, (ids, start) in enumerate(chunk):
        # lp[j, i] scores ids[i + 1]; scored tokens are ids[start:].
        sums[lo + j] = -lp[j, start - 1:len(ids) - 1].sum()
        counts[lo + j] = max(len(ids) - start, 0)
    return sums, counts

  def _logprobs(self, rows: list[list[int]]) -> np.ndarray:
    """(B, maxlen - 1) next-token log-probs of right-padded rows."""
    torch = self._torch
    width = max(2, max(len(r) for r in rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
      ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
      mask[i, :len(r)] = 1
    ids, mask = ids.to(self.device), mask.to(self.device)
    with torch.no_grad():
      logits = self.model(input_ids=ids, attention_mask=mask).logits
      lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
      out = torch.gather(lp, 2, ids[:, 1:, None])[..., 0]
    return out.double().cpu().numpy()


def evaluator_text(tokenizer, ids, separator: str) -> str:
  """`ids` decoded for the evaluator: the tokenizer drops eos, which would
  glue two documents into one run-on text (with byte-level BPE even their
  words), so each eos becomes `separator` between decoded pieces."""
  pieces, piece = [], []
  for t in np.asarray(ids).tolist():
    if t == tokenizer.eos_id:
      pieces.append(piece)
      piece = []
    else:
      piece.append(t)
  pieces.append(piece)
  return separator.join(tokenizer.decode(p) for p in pieces)


def load_evaluator(s: EvalSettings) -> HFEvaluator | None:
  return HFEvaluator(s.evaluator, s.evaluator_batch_size) if s.evaluator else (
      None)


# --------------------------------------------------------------------------
# Models and decoding.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  name: str  # Row name and samples file stem.
  kind: str  # 'data', 'teacher' or 'student'.
  run: str | None  # Run directory name under the workdir.
  k: int
  penalty: float = 0.0


def plan_models(windows: Sequence[int], s: EvalSettings) -> list[ModelEntry]:
  """The rows to evaluate (module docstring), given the trained windows."""
  plan = [ModelEntry('data', 'data', None, 1),
          ModelEntry('teacher', 'teacher', 'teacher', 1)]
  ks = s.ks or tuple(range(1, max(windows, default=0) + 1))
  for k in ks:
    fits = [w for w in windows if w >= k]
    if not fits:
      raise ValueError(f'eval.ks asks for k={k} but no student was trained '
                       f'with a window >= {k} (found {list(windows)})')
    run = f'student_k{fits[0]}'
    plan.append(ModelEntry(f'student_k{k}', 'student', run, k))
    if s.penalty(k) > 0:
      plan.append(ModelEntry(f'student_k{k}_penalty', 'student', run, k,
                             s.penalty(k)))
  return plan


def generate_fixed(cfg, params, prefixes_BxP, noise_BxT, k: int,
                   penalty: float = 0.0,
                   kernel_impl: str = 'auto') -> np.ndarray:
  """Exactly T = noise.shape[1] new tokens, k per pass, within seq_len.

  When k does not divide T, the last r = T % k tokens come from one more
  pass with r noise slots over [prefix | tokens so far]. A noise slot sees
  only slots before it, so this equals a full k-slot step with its extra
  tokens dropped, without running past model.seq_len.
  """
  max_new = noise_BxT.shape[1]
  main = max_new // k * k
  parts = []
  if main:
    parts.append(decode.generate(
        params, cfg, prefixes_BxP, max_new_tokens=main, k=k,
        noise=noise_BxT[:, :main], frequency_penalty=penalty,
        eos_id=None, kernel_impl=kernel_impl).tokens)
  if main < max_new:
    context = np.concatenate([prefixes_BxP] + parts, axis=1)
    parts.append(decode.generate(
        params, cfg, context, max_new_tokens=max_new - main,
        k=max_new - main, noise=noise_BxT[:, main:],
        frequency_penalty=penalty, eos_id=None,
        kernel_impl=kernel_impl).tokens)
  return np.concatenate(parts, axis=1)


def decode_all(cfg, params, entry: ModelEntry, prefixes_NxP, noise_NxT,
               batch_size: int, kernel_impl: str = 'auto'):
  """Decodes every prefix in batches. Returns (tokens (N, T), timing dict).

  Batches are padded to batch_size (one compilation per model). tokens/s
  counts every decoded row, a last partial batch's padding rows included
  (they cost as much as real ones), and excludes the first batch
  (compilation) when there is more than one.
  """
  n, max_new = noise_NxT.shape
  outs, times = [], []
  for lo in range(0, n, batch_size):
    rows = min(batch_size, n - lo)
    t0 = time.perf_counter()
    tokens = generate_fixed(
        cfg, params, _pad_rows(prefixes_NxP[lo:lo + rows], batch_size),
        _pad_rows(noise_NxT[lo:lo + rows], batch_size), entry.k,
        entry.penalty, kernel_impl)
    times.append((time.perf_counter() - t0, batch_size * max_new))
    outs.append(tokens[:rows])
  steady = times[1:] or times
  seconds = sum(t for t, _ in times)
  tps = sum(c for _, c in steady) / max(sum(t for t, _ in steady), 1e-9)
  return np.concatenate(outs), {'seconds': seconds, 'tokens_per_s': tps,
                                'includes_compile': len(times) == 1}


def eval_sequences(config, tokenizer, workdir: str, s: EvalSettings,
                   notes: list[str]) -> np.ndarray:
  """The first num_samples held-out sequences, (N, seq_len)."""
  split = s.split or config.data.eval_split
  batches = data_lib.make_eval_batches(
      config, tokenizer, workdir, batch_size=1, num_batches=s.num_samples,
      split=split)
  seqs = np.concatenate(batches)
  if len(seqs) < s.num_samples:
    notes.append(f'split {split!r} has only {len(seqs)} sequences; '
                 f'evaluated {len(seqs)} of eval.num_samples='
                 f'{s.num_samples}')
  return seqs


# --------------------------------------------------------------------------
# Schema validation.
# --------------------------------------------------------------------------

SETTINGS_TYPES = {
    'prefix_len': int, 'max_new_tokens': int, 'seq_len': int,
    'num_samples': int, 'batch_size': int, 'seed': int, 'bootstrap': int,
    'ci_level': float, 'split': str, 'evaluator': str, 'evaluator_scope': str,
}
METRIC_KEYS = (('teacher_ppl', 'evaluator_ppl', 'entropy') +
                tuple(f'distinct_{n}' for n in NGRAM_ORDERS) +
                (f'repetition_{REPETITION_N}',))


def _need(d, key, types, where):
  """d[key], checked to be one of `types`; ValueError names the key."""
  path = f'{where}.{key}' if where else key
  if not isinstance(d, dict) or key not in d:
    raise ValueError(f'eval.json: missing key {path!r}')
  value = d[key]
  types = types if isinstance(types, tuple) else (types,)
  # bool is an int subclass; never accept it where a number is meant.
  if not isinstance(value, types) or (
      isinstance(value, bool) and bool not in types):
    raise ValueError(f'eval.json: {path!r} is {type(value).__name__}, '
                     f'expected {"/".join(t.__name__ for t in types)}')
  return value


def _check_stat(stat, where: str):
  if not isinstance(stat, dict):
    raise ValueError(f'eval.json: {where!r} must be a stat object')
  n = _need(stat, 'n', int, where)
  vals = [_need(stat, key, (float, int, type(None)), where)
          for key in ('mean', 'lo', 'hi')]
  if (n == 0) != all(v is None for v in vals) or (
      n > 0 and any(v is None or not math.isfinite(v) for v in vals)):
    raise ValueError(f'eval.json: {where!r} has n={n} but mean/lo/hi='
                     f'{vals}; need finite numbers iff n > 0')
  if n > 0 and vals[1] > vals[2]:
    raise ValueError(f'eval.json: {where!r} has lo > hi')


def _check_model(entry, where: str):
  kind = _need(entry, 'kind', str, where)
  if kind not in ('data', 'teacher', 'student'):
    raise ValueError(f'eval.json: {where}.kind={kind!r} unknown')
  _need(entry, 'run', (str, type(None)), where)
  k = _need(entry, 'k', int, where)
  _need(entry, 'penalty', (float, int), where)
  _need(entry, 'samples_file', str, where)
  dec = _need(entry, 'decode', (dict, type(None)), where)
  if dec is not None:
    _need(dec, 'seconds', (float, int), f'{where}.decode')
    _need(dec, 'tokens_per_s', (float, int), f'{where}.decode')
    _need(dec, 'includes_compile', bool, f'{where}.decode')
  metrics = _need(entry, 'metrics', dict, where)
  for key in METRIC_KEYS:
    stat = _need(metrics, key, (dict, type(None)), f'{where}.metrics')
    if stat is None and key != 'evaluator_ppl':
      raise ValueError(f'eval.json: {where}.metrics.{key} is null')
    if stat is not None:
      _check_stat(stat, f'{where}.metrics.{key}')
  coupling = _need(entry, 'coupling', (dict, type(None)), where)
  if (coupling is None) != (kind != 'student'):
    raise ValueError(f'eval.json: {where}.coupling must be an object for '
                     'students and null otherwise')
  if coupling is not None:
    cw = f'{where}.coupling'
    _check_stat(_need(coupling, 'agreement', dict, cw), f'{cw}.agreement')
    _check_stat(_need(coupling, 'first_divergence', dict, cw),
                f'{cw}.first_divergence')
    slots = _need(coupling, 'per_slot', list, cw)
    if len(slots) != k:
      raise ValueError(f'eval.json: {cw}.per_slot has {len(slots)} entries, '
                       f'expected k={k}')
    for i, stat in enumerate(slots):
      _check_stat(stat, f'{cw}.per_slot[{i}]')
    sweep = coupling.get('noise_sweep')  # Absent in older eval.json files.
    if sweep is not None:
      noise_sweep.validate(sweep, f'{cw}.noise_sweep', _check_stat)


def validate_eval_json(d) -> None:
  """Checks `d` against the module docstring's schema; raises ValueError."""
  if not isinstance(d, dict):
    raise ValueError('eval.json: top level must be an object')
  version = _need(d, 'schema_version', int, '')
  if version != SCHEMA_VERSION:
    raise ValueError(f'eval.json: schema_version={version}, expected '
                     f'{SCHEMA_VERSION}')
  _need(d, 'name', str, '')
  settings = _need(d, 'settings', dict, '')
  for key, typ in SETTINGS_TYPES.items():
    _need(settings, key, (typ, int) if typ is float else typ, 'settings')
  notes = _need(d, 'notes', list, '')
  if not all(isinstance(x, str) for x in notes):
    raise ValueError("eval.json: 'notes' must hold strings")
  models = _need(d, 'models', dict, '')
  if 'teacher' not in models:
    raise ValueError("eval.json: missing key 'models.teacher'")
  for name, entry in models.items():
    _check_model(entry, f'models.{name}')


# --------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------


def _mean_or_none(total: float, count: int):
  return float(total / count) if count > 0 else None


def _model_row(entry, tokens_NxT, teacher_nll, evaluator_nll, teacher_tokens,
               timing, s: EvalSettings, sweep=None):
  """The eval.json entry of one model (see the schema)."""
  ci = dict(num_resamples=s.bootstrap, seed=s.seed, level=s.ci_level)
  stats = text_stats(tokens_NxT)
  metrics = {'teacher_ppl': perplexity_ci(*teacher_nll, s),
             'evaluator_ppl': (None if evaluator_nll is None else
                               perplexity_ci(*evaluator_nll, s))}
  metrics.update({key: bootstrap_ci(v, **ci) for key, v in stats.items()})
  coupling = None
  if entry.kind == 'student':
    c = coupling_stats(tokens_NxT, teacher_tokens, entry.k)
    coupling = {
        'agreement': bootstrap_ci(c['agreement'], **ci),
        'per_slot': [bootstrap_ci(c['per_slot'][:, i], **ci)
                     for i in range(entry.k)],
        'first_divergence': bootstrap_ci(c['first_divergence'], **ci),
        'noise_sweep': (None if sweep is None else noise_sweep.to_json(
            sweep, s.sweep_grid, lambda v: bootstrap_ci(v, **ci)))}
  return {'kind': entry.kind, 'run': entry.run, 'k': entry.k,
          'penalty': float(entry.penalty),
          'samples_file': f'samples/{entry.name}.jsonl',
          'decode': timing, 'metrics': metrics, 'coupling': coupling}, stats


def _sample_lines(entry, prefixes, tokens, prefix_texts, texts, teacher_nll,
                  evaluator_nll, entropy) -> str:
  lines = []
  for i in range(len(tokens)):
    ev = (None if evaluator_nll is None else
          _mean_or_none(evaluator_nll[0][i], evaluator_nll[1][i]))
    lines.append(json.dumps({
        'index': i, 'model': entry.name, 'k': entry.k,
        'penalty': float(entry.penalty), 'prefix': prefix_texts[i],
        'text': texts[i], 'prefix_ids': prefixes[i].tolist(),
        'token_ids': tokens[i].tolist(),
        'teacher_nll': _mean_or_none(teacher_nll[0][i], teacher_nll[1][i]),
        'evaluator_nll': ev,
        'entropy': (None if math.isnan(entropy[i]) else float(entropy[i]))},
                            ensure_ascii=False))
  return '\n'.join(lines) + '\n'


def _load_teacher(workdir: str, config):
  cfg, params, _ = checkpoints.load_params(os.path.join(workdir, 'teacher'))
  if cfg.seq_len != config.model.seq_len:
    raise ValueError(
        f'config model.seq_len={config.model.seq_len} but the teacher in '
        f'{workdir} was trained with seq_len={cfg.seq_len}; evaluate with the '
        "run's config")
  return cfg, params


def run_evaluate(config, workdir: str) -> dict:
  """Evaluates teacher and students in `workdir`; writes eval.json + samples.

  Returns the eval.json dict (already validated).
  """
  s = eval_settings(config)
  # Decoding's vocabulary projection (projection.py), as generate uses it.
  kernel_impl = projection.check_impl(str(
      (config.get('kernels', None) or {}).get('impl', 'auto')))
  evaluator = load_evaluator(s)  # Fail on a bad evaluator before decoding.
  teacher_cfg, teacher_params = _load_teacher(workdir, config)
  if not 1 <= s.prefix_len < teacher_cfg.seq_len:
    raise ValueError(f'eval.prefix_len={s.prefix_len} must be in [1, '
                     f'seq_len={teacher_cfg.seq_len})')
  plan = plan_models(checkpoints.trained_windows(workdir), s)
  notes = []
  if not any(e.kind == 'student' for e in plan):
    notes.append(f'no student_k* run in {workdir}: teacher only')
  if evaluator is None:
    notes.append('eval.evaluator is empty: evaluator_ppl skipped')
  tokenizer = data_lib.get_tokenizer(config, workdir)
  seqs = eval_sequences(config, tokenizer, workdir, s, notes)
  prefixes = seqs[:, :s.prefix_len]
  max_new = teacher_cfg.seq_len - s.prefix_len
  # One noise array shared by every model: it is what couples them.
  noise = np.asarray(jax.random.uniform(jax.random.PRNGKey(s.seed),
                                        (len(seqs), max_new)), np.float32)
  prefix_texts = [tokenizer.decode(p) for p in prefixes]
  if evaluator is not None:  # The same prefixes for every model.
    separator = evaluator.document_separator
    evaluator_prefixes = [evaluator_text(tokenizer, p, separator)
                          for p in prefixes]
  teacher_lp = teacher_logprob_fn(teacher_cfg, teacher_params)
  # Every run is restored before any scoring, so a damaged student
  # checkpoint stops evaluate at once, not after the earlier models.
  loaded = {'teacher': (teacher_cfg, teacher_params)}
  for entry in plan:
    if entry.run is not None and entry.run not in loaded:
      cfg, params, _ = checkpoints.load_params(os.path.join(workdir,
                                                            entry.run))
      loaded[entry.run] = cfg, params
  models, teacher_tokens, sample_files = {}, None, {}
  sweeper = _Sweeper(s, teacher_cfg, teacher_params, seqs, loaded)
  for entry in plan:
    if entry.kind == 'data':
      tokens, timing = np.asarray(seqs[:, s.prefix_len:]), None
    else:
      tokens, timing = decode_all(*loaded[entry.run], entry, prefixes, noise,
                                  s.batch_size, kernel_impl)
    if entry.kind == 'teacher':
      teacher_tokens = tokens
    full = np.concatenate([prefixes, tokens], axis=1)
    texts = [tokenizer.decode(row) for row in full]
    t_nll = sequence_nll(teacher_lp, full, s.prefix_len, s.batch_size)
    e_nll = None
    if evaluator is not None:
      e_nll = evaluator.nll(
          evaluator_prefixes,
          [evaluator_text(tokenizer, row, separator) for row in full])
    row, stats = _model_row(entry, tokens, t_nll, e_nll, teacher_tokens,
                            timing, s, sweeper.per_context(entry))
    models[entry.name] = row
    # Written with eval.json at the end: a run that fails part-way leaves
    # the previous eval.json and the samples it describes as they were.
    sample_files[row['samples_file']] = _sample_lines(
        entry, prefixes, tokens, prefix_texts, texts, t_nll, e_nll,
        stats['entropy'])
    _print_progress(entry, row, len(tokens), max_new)
  result = {
      'schema_version': SCHEMA_VERSION, 'name': str(config.get('name', '')),
      'settings': {
          'prefix_len': s.prefix_len, 'max_new_tokens': max_new,
          'seq_len': teacher_cfg.seq_len, 'num_samples': len(seqs),
          'batch_size': s.batch_size, 'seed': s.seed,
          'bootstrap': s.bootstrap, 'ci_level': s.ci_level,
          'split': s.split or config.data.eval_split,
          'evaluator': s.evaluator, 'evaluator_scope': 'continuation'},
      'notes': notes, 'models': models}
  validate_eval_json(result)
  if sharding.is_main_process():  # Every process computed the same.
    os.makedirs(os.path.join(workdir, 'samples'), exist_ok=True)
    for name, text in sample_files.items():
      files.atomic_write_text(os.path.join(workdir, name), text)
    files.atomic_write_text(
        os.path.join(workdir, 'eval.json'),
        json.dumps(result, indent=1, allow_nan=False) + '\n')
    _note_other_samples(workdir,
                        {row['samples_file'] for row in models.values()})
  return result


class _Sweeper:
  """Noise sweeps of the plan's students (noise_sweep.py), one per run.

  Contexts are held-out sequences cut at t >= prefix_len - 1 (seed
  eval.seed); the teacher's grids are swept once and shared.
  """

  def __init__(self, s: EvalSettings, teacher_cfg, teacher_params, seqs,
               loaded):
    self._s, self._seqs, self._loaded = s, seqs, loaded
    self._teacher = teacher_cfg, teacher_params
    self._u = noise_sweep.grid(s.sweep_grid)
    self._contexts = self._teacher_grids = None
    self._runs = {}

  def per_context(self, entry):
    if (entry.kind != 'student' or entry.penalty > 0 or
        self._s.sweep_contexts == 0):
      return None
    if entry.run not in self._runs:
      if self._contexts is None:
        print(f'[eval] noise sweep: the teacher\'s map at '
              f'{self._s.sweep_contexts} held-out contexts x '
              f'{self._s.sweep_grid} u, then each student\'s slot 1',
              flush=True)
        self._contexts = noise_sweep.pick_contexts(
            len(self._seqs), self._seqs.shape[1], self._s.prefix_len - 1,
            self._s.sweep_contexts, self._s.seed)
        self._teacher_grids = noise_sweep.teacher_grids(
            *self._teacher, self._seqs, *self._contexts, self._u)
      self._runs[entry.run] = noise_sweep.sweep_student(
          *self._loaded[entry.run], self._seqs, *self._contexts, self._u,
          self._teacher_grids)
    return self._runs[entry.run]


def _note_other_samples(workdir: str, written: set[str]) -> None:
  """Names sample files an earlier evaluate left; never deletes results."""
  other = sorted(
      f'samples/{f}' for f in os.listdir(os.path.join(workdir, 'samples'))
      if f.endswith('.jsonl') and f'samples/{f}' not in written)
  if other:
    print(f'[eval] NOTE: {", ".join(other)} in {workdir} are from an earlier '
          'evaluate and not in this eval.json (kept; delete them if unwanted)',
          flush=True)


def _fmt(stat) -> str:
  if stat is None or stat['mean'] is None:
    return 'n/a'
  return f"{stat['mean']:.3g} [{stat['lo']:.3g}, {stat['hi']:.3g}]"


def _print_progress(entry, row, num, max_new):
  m = row['metrics']
  dec = row['decode']
  speed = ('' if dec is None else
           f", {dec['tokens_per_s']:,.0f} tok/s" +
           (' (one batch: incl. compile)' if dec['includes_compile'] else ''))
  line = (f'[eval] {entry.name}: {num} x {max_new} tokens{speed}, '
          f"teacher ppl {_fmt(m['teacher_ppl'])}, entropy "
          f"{_fmt(m['entropy'])}")
  if m['evaluator_ppl'] is not None:
    line += f", evaluator ppl {_fmt(m['evaluator_ppl'])}"
  if row['coupling'] is not None:
    line += f", agreement {_fmt(row['coupling']['agreement'])}"
    sweep = row['coupling']['noise_sweep']
    if sweep is not None:
      line += (f"; noise sweep ({sweep['contexts']} contexts x "
               f"{sweep['grid']} u): slot-1 accuracy "
               f"{_fmt(sweep['accuracy'])}, distinct tokens "
               f"{_fmt(sweep['distinct_student'])} (teacher "
               f"{_fmt(sweep['distinct_teacher'])}), entropy "
               f"{_fmt(sweep['entropy_student'])} (teacher "
               f"{_fmt(sweep['entropy_teacher'])})")
  print(line, flush=True)
