"""Noise sweep: how finely a student's first slot resolves the teacher's map.

At a context x_<=t the AR teacher's sampling map u -> F_T^-1(u | x_<=t) gives
token v the u-interval of length p_T(v | x_<=t). Sweeping u over the G grid
midpoints (g + 1/2) / G and counting tokens recovers p_T to within 1/G per
token. The same sweep through a student's first noise slot shows the
distribution its map pushes U(0, 1) to at that context; a student computing
the map exactly would give the teacher's tokens at every grid point. Sample
metrics (eval.json `metrics`) mix this with everything later in a rollout;
the sweep isolates it, per context (the student's token read out as its
row's readout does, argmax or median; not the sampled readout, whose
uniform frac(1024 u) is constant over the grid's midpoints when G divides
1024, e.g. the default 1024):

  accuracy          fraction of grid points where student token == teacher's
  distinct_teacher  distinct tokens over the grid: the teacher's map, and
  distinct_student  the student's
  entropy_teacher   entropy (nats) of the grid's token histogram: about the
  entropy_student   teacher's next-token entropy, and the entropy of the
                    student's push-forward at the same context

Slot 1 only: it is the one slot whose map every student shares with the
teacher's one-token map (slot i > 1 also depends on u_1..u_(i-1)). Under
self-forcing only the k=1 stage learns it from the AR teacher directly;
later stages learn it from the previous stage's slot 1, so for them the
sweep measures the whole chain against the teacher (noise inversion trains
every stage on the teacher's data tokens). Counts are over the grid: as u
varies continuously the teacher's map reaches every token of positive
mass, so `distinct_*` grow with G. The sweep does not apply the frequency
penalty (which counts the context's tokens too): penalised rows get none.

JSON form (eval.json `coupling.noise_sweep` of an unpenalised student row):
  {"grid": int, "contexts": int, "accuracy": STAT, "distinct_teacher": STAT,
   "distinct_student": STAT, "entropy_teacher": STAT, "entropy_student": STAT}
with STAT the bootstrap mean/CI over contexts (eval_metrics.bootstrap_ci).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import distill
from kforcing_jax import model as model_lib
from kforcing_jax import noise as noise_lib
from kforcing_jax import projection
from kforcing_jax import token_stats

STAT_KEYS = ('accuracy', 'distinct_teacher', 'distinct_student',
             'entropy_teacher', 'entropy_student')
# Grid points per student forward pass: bounds the (chunk, vocab) logits
# and the (N + chunk)^2 attention mask held at once.
_CHUNK = 256


def grid(size: int) -> np.ndarray:
  """The G midpoints (g + 1/2) / G, float32 (as decoding noise is)."""
  return ((np.arange(size) + 0.5) / size).astype(np.float32)


def pick_contexts(num_rows: int, seq_len: int, first_t: int, count: int,
                  seed: int):
  """Up to `count` distinct (row, t) pairs, t in [first_t, seq_len - 2],
  fixed by seed; every pair when there are fewer than `count` (they were
  drawn with replacement then, and the repeats passed for independent
  contexts, narrowing the intervals).

  t is the last context position; the swept slot predicts token t + 1, so
  t + 1 <= seq_len - 1.
  """
  ts = np.arange(first_t, seq_len - 1)
  if num_rows < 1 or ts.size < 1:
    raise ValueError(f'noise sweep: no context positions in {num_rows} rows '
                     f'with t in [{first_t}, {seq_len - 2}]')
  rng = np.random.default_rng(seed)
  total = num_rows * ts.size
  flat = rng.choice(total, size=min(count, total), replace=False)
  return flat // ts.size, ts[flat % ts.size]


@functools.lru_cache(maxsize=None)
def _teacher_fn(cfg):
  def tokens(params, tokens_1xN, t, u_G):
    # One forward and one row of logits; every u reuses that row's CDF
    # tables (noise.inverse_cdf at the default precision, 'auto', and
    # temperature 1, as the stage-1 targets use unless distill.precision
    # or distill.teacher_temperature says otherwise).
    h = model_lib.Transformer(cfg).apply(
        {'params': params}, tokens_1xN, method=model_lib.Transformer.hidden)
    logits_1x1xV = projection.logits(h[:, t], params['unembed']['kernel'])
    return noise_lib.inverse_cdf(logits_1x1xV[:, None], u_G[None])[0]
  return jax.jit(tokens)


@functools.lru_cache(maxsize=None)
def _student_fn(cfg, readout: str, temperature: float):
  if readout not in ('argmax', 'median'):
    raise ValueError(f"noise sweep of readout={readout!r}: 'argmax' or "
                     "'median' (a sampled readout's uniform frac(1024 u) "
                     'follows the grid, not the noise)')

  def tokens(params, tokens_1xN, windows_1xG, u_1xGx1):
    # Full logits ('reference') at the default precision, on any backend.
    h = distill.pf_slot_hidden(cfg, params, tokens_1xN, windows_1xG,
                               u_1xGx1)
    return distill.readout_slots(params, h, u_1xGx1, 'reference', readout,
                                 'auto', temperature)[0, :, 0]
  return jax.jit(tokens)


def _student_sweep(fn, params, tokens_N, t: int, u_G) -> np.ndarray:
  """Chunks of u through the training layout (one window per u)."""
  out = []
  for lo in range(0, len(u_G), _CHUNK):
    u = u_G[lo:lo + _CHUNK]
    pad = _CHUNK - len(u) if len(u_G) > _CHUNK else 0  # One compiled shape.
    u = np.pad(u, (0, pad), constant_values=0.5)
    windows = np.full((1, len(u)), t, np.int32)
    got = fn(params, jnp.asarray(tokens_N[None], jnp.int32), windows,
             jnp.asarray(u[None, :, None]))
    out.append(np.asarray(got)[:len(u) - pad])
  return np.concatenate(out)


def teacher_tokens(cfg, params, tokens_N, t: int, u_G) -> np.ndarray:
  """The AR teacher's inverse-CDF token after x_<=t, at each u: (G,)."""
  return np.asarray(_teacher_fn(cfg)(
      params, jnp.asarray(tokens_N[None], jnp.int32), jnp.int32(t),
      jnp.asarray(u_G)))


def student_tokens(cfg, params, tokens_N, t: int, u_G, readout='argmax',
                   temperature=1.0) -> np.ndarray:
  """A student's slot-1 token after x_<=t by `readout` (at `temperature`
  unless argmax), at each u: (G,)."""
  return _student_sweep(_student_fn(cfg, readout, float(temperature)),
                        params, tokens_N, t, u_G)


def grid_stats(student_G, teacher_G) -> dict[str, float]:
  """The per-context metrics of the module docstring."""
  student_G, teacher_G = np.asarray(student_G), np.asarray(teacher_G)
  if student_G.shape != teacher_G.shape or student_G.ndim != 1:
    raise ValueError(f'grid_stats: shapes {student_G.shape} and '
                     f'{teacher_G.shape}; need two equal 1-D grids')
  return {'accuracy': float((student_G == teacher_G).mean()),
          'distinct_teacher': float(np.unique(teacher_G).size),
          'distinct_student': float(np.unique(student_G).size),
          'entropy_teacher': token_stats.unigram_entropy(teacher_G),
          'entropy_student': token_stats.unigram_entropy(student_G)}


def teacher_grids(cfg, params, seqs_NxL, rows, ts, u_G) -> list[np.ndarray]:
  """The teacher's swept tokens at every (row, t): computed once, shared by
  every student."""
  return [teacher_tokens(cfg, params, seqs_NxL[r], int(t), u_G)
          for r, t in zip(rows, ts)]


def sweep_student(cfg, params, seqs_NxL, rows, ts, u_G, teacher_G_list,
                  readout='argmax', temperature=1.0) -> dict[str, np.ndarray]:
  """Per-context metrics (each an array over contexts) of one student read
  out by `readout` at `temperature`."""
  per = [grid_stats(student_tokens(cfg, params, seqs_NxL[r], int(t), u_G,
                                   readout, temperature), teacher_G)
         for r, t, teacher_G in zip(rows, ts, teacher_G_list)]
  return {key: np.array([p[key] for p in per]) for key in STAT_KEYS}


def to_json(per_context: dict[str, np.ndarray], grid_size: int,
            ci_fn) -> dict:
  """eval.json form; ci_fn(values) -> STAT (eval_metrics.bootstrap_ci)."""
  out = {'grid': int(grid_size),
         'contexts': int(len(per_context['accuracy']))}
  out.update({key: ci_fn(per_context[key]) for key in STAT_KEYS})
  return out


def validate(sweep, where: str, check_stat) -> None:
  """Checks one `coupling.noise_sweep` object; ValueError names the key."""
  if not isinstance(sweep, dict):
    raise ValueError(f'eval.json: {where!r} must be an object or null')
  for key in ('grid', 'contexts'):
    value = sweep.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f'eval.json: {where}.{key}={value!r}; need an int '
                       '>= 1')
  for key in STAT_KEYS:
    if key not in sweep:
      raise ValueError(f"eval.json: missing key '{where}.{key}'")
    check_stat(sweep[key], f'{where}.{key}')
