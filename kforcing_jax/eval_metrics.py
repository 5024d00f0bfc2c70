"""The per-sample statistics of evaluate and their bootstrap confidence
intervals: text statistics of the generated tokens, coupling with the
teacher's rollout, and likelihoods (NLL, perplexity) under a model; plus
`batched` and `pad_rows`, which run a jitted function over padded batches
so it compiles once."""

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import eval_settings
from kforcing_jax import model as model_lib
from kforcing_jax import noise as noise_lib
from kforcing_jax import token_stats

NGRAM_ORDERS = (1, 2, 3, 4)
REPETITION_N = 4

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
    the number of usable samples. Callers pass eval.seed everywhere, so
    metrics with the same usable samples resample the same sets of them
    (those with fewer, e.g. distinct-4 of samples under 4 tokens, differ).
    The intervals treat samples as independent; the eval samples are
    consecutive chunks of the held-out stream, so neighbours can share a
    document and the intervals are somewhat narrow.
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
  that loops is close to 1; one without repeated n-grams is 0; one shorter
  than n has no n-gram to repeat: nan, as in `distinct_n` (a 0 there
  passed for a measurement).
  """
  grams = _ngrams(tokens, n)
  length = np.asarray(tokens).size
  if not grams:
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


def _per_slot(equal_NxT: np.ndarray, k: int) -> np.ndarray:
  """(N, k): mean of equal over positions n with n % k == s (NaN if none)."""
  slots = np.arange(equal_NxT.shape[1]) % k
  return np.stack([equal_NxT[:, slots == i].mean(1) if (slots == i).any()
                   else np.full(len(equal_NxT), np.nan) for i in range(k)], 1)


def coupling_stats(student_NxT, teacher_NxT, k: int,
                   forced_NxT=None) -> dict[str, Any]:
  """Per-sample agreement of a student's tokens with the teacher's.

  Args:
    student_NxT: the student's generated tokens.
    teacher_NxT: the teacher's rollout from the same prefixes and noise.
    k: the student's tokens per step.
    forced_NxT: optional, the teacher's token at each of the student's
      positions, given the student's own tokens before it and the same u
      (`teacher_scores_fn`).
  Returns:
    {'agreement': (N,) fraction of positions equal to the rollout,
     'per_slot': (N, k) the same over positions n with n % k == s,
     'first_divergence': (N,) tokens before the first mismatch (T if none)},
    and with forced_NxT 'forced_agreement' (N,) and 'forced_per_slot'
    (N, k), the same against the teacher's forced tokens. The rollout's
    contexts part at the first mismatch, so its later positions say little
    about the student; the forced tokens share the student's context at
    every position, so they measure each slot's map throughout.
  """
  s, t = np.asarray(student_NxT), np.asarray(teacher_NxT)
  if s.shape != t.shape:
    raise ValueError(f'student tokens {s.shape} vs teacher {t.shape}')
  equal = s == t
  first = np.where(equal.all(1), s.shape[1], np.argmin(equal, axis=1))
  out = {'agreement': equal.mean(1), 'per_slot': _per_slot(equal, k),
         'first_divergence': first.astype(np.float64)}
  if forced_NxT is not None:
    forced = np.asarray(forced_NxT)
    if forced.shape != s.shape:
      raise ValueError(f'student tokens {s.shape} vs forced {forced.shape}')
    out['forced_agreement'] = (s == forced).mean(1)
    out['forced_per_slot'] = _per_slot(s == forced, k)
  return out


def batched(fn, arrays, batch_size: int):
  """`fn` over the rows of `arrays` (each (N, ...)) in batches of
  `batch_size`, the last padded to that size so a jitted `fn` compiles once.

  Returns fn's output (an array, or a tuple of arrays) for all N rows,
  padding cut off, as numpy arrays.
  """
  arrays = [np.asarray(a) for a in arrays]
  n, parts, single = len(arrays[0]), [], False
  if n == 0 or any(len(a) != n for a in arrays):
    raise ValueError(f'batched needs the same number (> 0) of rows in '
                     f'every array, got {[len(a) for a in arrays]}')
  for lo in range(0, n, batch_size):
    got = fn(*(pad_rows(a[lo:lo + batch_size], batch_size) for a in arrays))
    single = not isinstance(got, tuple)
    parts.append([np.asarray(g)[:min(batch_size, n - lo)]
                  for g in ((got,) if single else got)])
  out = tuple(np.concatenate(column) for column in zip(*parts))
  return out[0] if single else out


def nll_from_logprobs(logprobs_NxLm1, start: int):
  """NLL of tokens[:, start:] given everything before them.

  Args:
    logprobs_NxLm1: (N, L - 1) log p(tokens[:, j + 1] | tokens[:, :j + 1]),
      e.g. the first output of `teacher_scores_fn` run through `batched`.
    start: index of the first scored token (the prefix length, >= 1).
  Returns:
    (nll_sum (N,), count (N,)) in float64 / int.
  """
  lp = np.asarray(logprobs_NxLm1, np.float64)
  n, length = lp.shape[0], lp.shape[1] + 1
  if not 1 <= start < length:
    raise ValueError(f'start={start} must be in [1, {length})')
  return -lp[:, start - 1:].sum(1), np.full(n, length - start)


def teacher_scores_fn(cfg: model_lib.ModelConfig, params):
  """(B, L) tokens, (B, T) u -> (log-probs (B, L - 1), forced (B, T)),
  from one full causal forward of an AR model at temperature 1 (as it
  decodes).

  log-probs[:, j] is log p(tokens[:, j + 1] | tokens[:, :j + 1]); forced is
  the inverse-CDF token at each of the last T positions, given the tokens
  before it and that position's u: what the teacher would have emitted
  there in the same context under the same noise.
  """
  model = model_lib.Transformer(cfg)

  @jax.jit
  def fn(p, tokens, u):
    logits = model.apply({'params': p}, tokens).astype(jnp.float32)
    lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    lp = jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
    return lp, noise_lib.inverse_cdf(logits[:, -u.shape[1] - 1:-1], u)

  return lambda tokens, u: fn(params, jnp.asarray(tokens, jnp.int32),
                              jnp.asarray(u, jnp.float32))


def pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
  """Pads `a` to `rows` rows by repeating its first row."""
  if len(a) >= rows:
    return a
  return np.concatenate([a, np.repeat(a[:1], rows - len(a), axis=0)])


def perplexity_ci(nll_sum, count, s: eval_settings.EvalSettings) -> dict:
  """exp(total NLL / total tokens) with a bootstrap CI over samples."""
  count = np.asarray(count, np.float64)
  with np.errstate(invalid='ignore', divide='ignore'):
    per_token = np.asarray(nll_sum, np.float64) / count
  return bootstrap_ci(per_token, count, num_resamples=s.bootstrap,
                      seed=s.seed, level=s.ci_level, transform=np.exp)
