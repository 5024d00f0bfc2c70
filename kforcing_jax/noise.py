"""Uniform decoding noise: inverse-CDF sampling and the student's noise encoder.

The AR teacher samples a token from logits by inverse CDF: draw u ~ U(0, 1)
and return the smallest vocabulary id whose cumulative probability reaches u
(cumulative sums run in vocabulary-id order). K-Forcing hands the same u to
the student as an input "noise slot", embedded by `NoiseEncoder`, so that the
student can learn the deterministic map (context, u) -> token.

Because the student is trained to reproduce this map exactly, the teacher's
map must be a well-defined function of u and must not depend on rounding more
than necessary. `inverse_cdf` therefore

  * never returns a token whose probability is zero in the working precision
    (logit -inf, or exp underflowed), for any u in [0, 1);
  * compares u * Z against unnormalised cumulative sums (Z = total mass), so
    the normaliser's rounding does not move the boundaries;
  * in float32 keeps the cumulative sums accurate to far below one float32
    ulp of u (see `_tables`): over a 50k vocabulary a float32 cumsum
    disagrees with a float64 reference on 6e-4 (XLA's windowed cumsum) to
    several percent (sequential) of draws, this path on ~6e-6 (what is left
    is float32 rounding of exp itself).

Shapes: `...` is any batch shape; V vocabulary size; K block size (`_BLOCK`);
G = ceil(V / K) blocks.
"""

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from kforcing_jax.kernels import _common

# Vocabulary ids per block of the two-level CDF. 128 is one TPU lane row.
_BLOCK = 128

# Half-width, in float ulps, of the search window `sample_u_in_interval` uses
# to repair a u that rounding placed just outside its token's preimage.
_NUDGE_ULPS = 64

_PRECISIONS = ('auto', 'float32', 'float64')


# --------------------------------------------------------------------------
# Precision helpers.
# --------------------------------------------------------------------------


def working_dtype(precision: str):
  """Maps the `precision` argument to a float dtype, validating it."""
  if precision not in _PRECISIONS:
    raise ValueError(f'precision must be one of {_PRECISIONS}, got '
                     f'{precision!r}')
  x64 = bool(jax.config.jax_enable_x64)
  if precision == 'float64':
    if not x64:
      raise ValueError(
          "precision='float64' needs 64-bit floats, but jax_enable_x64 is "
          "disabled: call jax.config.update('jax_enable_x64', True) (or set "
          "JAX_ENABLE_X64=1, or use `with jax.enable_x64(True):`), or pass "
          "precision='float32'")
    return jnp.float64
  if precision == 'float32':
    return jnp.float32
  return jnp.float64 if x64 else jnp.float32


def _split(a):
  """Splits a float exactly into hi + lo, each with about half the bits.

  Masking the low mantissa bits (rather than Dekker's multiply-based split)
  keeps the split exact even if the compiler contracts a*b+c into an FMA.
  """
  if a.dtype == jnp.float32:
    ubits, mask = jnp.uint32, np.uint32(0xFFFFF000)  # hi keeps 12 bits.
  else:
    ubits, mask = jnp.uint64, np.uint64(0xFFFFFFFFF8000000)  # hi keeps 26.
  hi = lax.bitcast_convert_type(
      lax.bitcast_convert_type(a, ubits) & mask, a.dtype)
  return hi, a - hi


def _two_sum(a, b):
  """Returns (s, e) with s = fl(a + b) and s + e = a + b exactly."""
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def _two_prod(a, b):
  """Returns a double word (p, e) with p + e = a * b to ~2^-35 (f32).

  Only products of split halves are formed, and those are exact, so the
  result is the same whether or not XLA contracts a*b+c into an FMA. (It
  does on CPU; Dekker's p = fl(a*b), e = a*b - p breaks when `p` is
  recomputed as part of an FMA in a consumer.)
  """
  a, b = jnp.broadcast_arrays(a, b)
  a_hi, a_lo = _split(a)
  b_hi, b_lo = _split(b)
  p, e = _two_sum(a_hi * b_hi, a_hi * b_lo + a_lo * b_hi)
  return p, e + a_lo * b_lo


# --------------------------------------------------------------------------
# The two-level CDF.
# --------------------------------------------------------------------------


class _Tables(NamedTuple):
  """Per-row CDF tables (leading dims = the logits' batch shape).

  Every cumulative mass is an unevaluated sum hi + lo (see `_tables`).
  """
  q_GxK: jax.Array  # exp((logit - max) / T), zero-padded to G*K ids.
  w_hi_GxK: jax.Array  # Inclusive within-block cumsum of q_hi (exact).
  w_lo_GxK: jax.Array  # ... of q_lo (rounded, but tiny).
  end_hi_G: jax.Array  # w at the block's last positive token (hi part;
  end_lo_G: jax.Array  # -inf if the block has no positive token).
  pre_hi_G: jax.Array  # Exclusive prefix of block totals (exact).
  pre_lo_G: jax.Array
  tot_hi: jax.Array  # Total mass Z = tot_hi + tot_lo.
  tot_lo: jax.Array
  last_pos: jax.Array  # int32 id of the last token with q > 0 (0 if none).


def _tables(logits_xV, temperature, dtype) -> _Tables:
  """Builds the blocked CDF of softmax(logits / temperature) in `dtype`.

  Accuracy argument. A plain float32 cumsum over ~50k ids drifts by many
  ulps of Z, and every boundary after a rounding error moves with it; a
  single block holding a quarter of the mass already shifts the rest of the
  CDF by ~1e-8. Here each q is split exactly into q_hi + q_lo, with q_hi
  rounded to the grid `unit` = 2^(e+1-p) (p mantissa bits, Z < 2^e). Every
  partial sum of q_hi values is then a multiple of `unit` below
  2^p * unit, hence exactly representable: the hi cumsums are exact in any
  summation order (cumsum lowering, TPU reduce-window, ...). The q_lo are
  below unit/2 each, so their rounded cumsums err by a tiny fraction of an
  ulp of Z. Token v = b*K + j then has F(v) = (pre[b] + w[b, j]) as hi + lo
  words, and `_lookup` compares u * Z against it in double-word arithmetic.
  """
  vocab = logits_xV.shape[-1]
  l_xV = logits_xV.astype(dtype)
  m = jnp.max(l_xV, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0)  # All -inf rows: avoid -inf - -inf.
  temp = jnp.asarray(temperature, dtype)[..., None]
  # Subtract the max before dividing: (l - m) / T <= 0, so q <= 1 = q(argmax).
  q_xV = jnp.exp((l_xV - m) / temp)
  q_xV = jnp.where(q_xV > 0, q_xV, 0)  # NaN logits count as zero mass.

  g = -(-vocab // _BLOCK)
  pad = [(0, 0)] * (q_xV.ndim - 1) + [(0, g * _BLOCK - vocab)]
  q_GxK = jnp.pad(q_xV, pad).reshape(q_xV.shape[:-1] + (g, _BLOCK))
  pos_GxK = q_GxK > 0

  nbits = jnp.finfo(dtype).nmant + 1
  _, e = jnp.frexp(jnp.sum(q_GxK, axis=(-2, -1)))
  one = jnp.ones((), dtype)
  unit = jnp.ldexp(one, e + 1 - nbits)[..., None, None]
  inv_unit = jnp.ldexp(one, nbits - 1 - e)[..., None, None]
  q_hi = jnp.round(q_GxK * inv_unit) * unit  # Power-of-two scaling: exact.
  q_lo = q_GxK - q_hi  # Exact, |q_lo| <= unit / 2.
  w_hi_GxK = jnp.cumsum(q_hi, axis=-1)
  w_lo_GxK = jnp.cumsum(q_lo, axis=-1)

  # w at the last positive token of each block: the block's largest
  # selectable mass, so the block test in `_lookup` matches its token test.
  j_end = _BLOCK - 1 - jnp.argmax(pos_GxK[..., ::-1], axis=-1)
  has_pos = jnp.any(pos_GxK, axis=-1)
  take = lambda w: jnp.take_along_axis(w, j_end[..., None], axis=-1)[..., 0]
  end_hi_G = jnp.where(has_pos, take(w_hi_GxK), -jnp.inf)
  end_lo_G = jnp.where(has_pos, take(w_lo_GxK), 0)

  shift = [(0, 0)] * (q_xV.ndim - 1) + [(1, 0)]
  exclusive = lambda x: jnp.cumsum(jnp.pad(x, shift)[..., :-1], axis=-1)
  pre_hi_G = exclusive(w_hi_GxK[..., -1])
  pre_lo_G = exclusive(w_lo_GxK[..., -1])
  tot_hi = pre_hi_G[..., -1] + w_hi_GxK[..., -1, -1]  # Exact.
  tot_lo = pre_lo_G[..., -1] + w_lo_GxK[..., -1, -1]

  pos_xV = pos_GxK.reshape(pos_GxK.shape[:-2] + (g * _BLOCK,))
  last_pos = g * _BLOCK - 1 - jnp.argmax(pos_xV[..., ::-1], axis=-1)
  last_pos = jnp.where(jnp.any(pos_xV, axis=-1), last_pos, 0)
  return _Tables(q_GxK, w_hi_GxK, w_lo_GxK, end_hi_G, end_lo_G, pre_hi_G,
                 pre_lo_G, tot_hi, tot_lo, last_pos.astype(jnp.int32))


def _row_ids(lead_shape, out_shape):
  """Flat row index (into the logits' batch) of every output element."""
  n = math.prod(lead_shape)
  return jnp.broadcast_to(
      jnp.arange(n, dtype=jnp.int32).reshape(lead_shape), out_shape)


def _reaches(w_hi, w_lo, r_hi, r_lo):
  """w >= r for double words w, r, as (w_hi - r_hi) >= (r_lo - w_lo).

  Where the answer is close, w_hi and r_hi are close, so the left side is
  exact (Sterbenz) and only the tiny lo words are rounded.
  """
  return (w_hi - r_hi) >= (r_lo - w_lo)


def _lookup(tab: _Tables, u) -> jax.Array:
  """Inverse CDF on prebuilt tables; u broadcasts against the logits batch.

  Costs O(G + K) per u (not O(V)), so many u per row of logits are cheap.
  """
  dtype = tab.q_GxK.dtype
  lead = tab.q_GxK.shape[:-2]
  g = tab.q_GxK.shape[-2]
  out_shape = jnp.broadcast_shapes(lead, jnp.shape(u))
  u = jnp.broadcast_to(jnp.asarray(u).astype(dtype), out_shape)

  # Target t = u * Z as a double word.
  t_hi, t_lo = _two_prod(u, tab.tot_hi)
  t_lo = t_lo + u * tab.tot_lo
  # Mass r still needed inside block b, as a double word.
  r_hi_G, r_err_G = _two_sum(t_hi[..., None], -tab.pre_hi_G)
  r_lo_G = (t_lo[..., None] - tab.pre_lo_G) + r_err_G
  ok_G = _reaches(tab.end_hi_G, tab.end_lo_G, r_hi_G, r_lo_G)
  found = jnp.any(ok_G, axis=-1)
  b = jnp.argmax(ok_G, axis=-1).astype(jnp.int32)
  r_hi = jnp.take_along_axis(r_hi_G, b[..., None], axis=-1)
  r_lo = jnp.take_along_axis(r_lo_G, b[..., None], axis=-1)

  rows = _row_ids(lead, out_shape) * g + b
  q_K = tab.q_GxK.reshape(-1, _BLOCK)[rows]
  w_hi_K = tab.w_hi_GxK.reshape(-1, _BLOCK)[rows]
  w_lo_K = tab.w_lo_GxK.reshape(-1, _BLOCK)[rows]
  pos_K = q_K > 0
  ok_K = pos_K & _reaches(w_hi_K, w_lo_K, r_hi, r_lo)
  j_first = jnp.argmax(ok_K, axis=-1)
  # Only reachable if the compiler rounded differently in the block and the
  # token test; the block's last positive token keeps "never zero mass".
  j_last = _BLOCK - 1 - jnp.argmax(pos_K[..., ::-1], axis=-1)
  j = jnp.where(jnp.any(ok_K, axis=-1), j_first, j_last)
  tok = b * _BLOCK + j.astype(jnp.int32)
  # No block reaches t (u rounds up to ~1, or u >= 1): last positive token.
  tok = jnp.where(found, tok, jnp.broadcast_to(tab.last_pos, out_shape))
  return tok.astype(jnp.int32)


def _interval(tab: _Tables, tokens):
  """Normalised [F(v-1), F(v)] per token; empty (lo == hi) if q(v) == 0."""
  lead = tab.q_GxK.shape[:-2]
  g = tab.q_GxK.shape[-2]
  out_shape = jnp.broadcast_shapes(lead, jnp.shape(tokens))
  v = jnp.broadcast_to(jnp.asarray(tokens, jnp.int32), out_shape)
  v = jnp.clip(v, 0, g * _BLOCK - 1)
  b, j = v // _BLOCK, v % _BLOCK
  rows = _row_ids(lead, out_shape) * g + b
  flat = rows * _BLOCK + j
  prev = jnp.maximum(flat - 1, 0)
  w_hi, w_lo = tab.w_hi_GxK.reshape(-1), tab.w_lo_GxK.reshape(-1)
  pre_hi = tab.pre_hi_G.reshape(-1)[rows]
  pre_lo = tab.pre_lo_G.reshape(-1)[rows]
  z = tab.tot_hi + tab.tot_lo
  z = jnp.broadcast_to(jnp.where(z > 0, z, 1), out_shape)  # All -inf rows.
  # pre_hi + w_hi is a multiple of `unit` below 2^p units: exact.
  hi = ((pre_hi + w_hi[flat]) + (pre_lo + w_lo[flat])) / z
  lo = ((pre_hi + jnp.where(j > 0, w_hi[prev], 0)) +
        (pre_lo + jnp.where(j > 0, w_lo[prev], 0))) / z
  q_v = tab.q_GxK.reshape(-1)[flat]
  lo = jnp.clip(lo, 0, 1)
  hi = jnp.where(q_v > 0, jnp.clip(hi, lo, 1), lo)
  return lo, hi


@functools.partial(jax.jit, static_argnames=('dtype',))
def _inverse_cdf_jit(logits, u, temperature, dtype):
  return _lookup(_tables(logits, temperature, dtype), u)


@functools.partial(jax.jit, static_argnames=('dtype',))
def _interval_jit(logits, tokens, temperature, dtype):
  return _interval(_tables(logits, temperature, dtype), tokens)


@functools.partial(jax.jit, static_argnames=('dtype',))
def _sample_u_jit(rng, logits, tokens, temperature, dtype):
  """See `sample_u_in_interval`."""
  tab = _tables(logits, temperature, dtype)
  lo, hi = _interval(tab, tokens)
  target = jnp.broadcast_to(jnp.asarray(tokens, jnp.int32), lo.shape)
  w = jax.random.uniform(rng, lo.shape, dtype)
  u_max = jnp.nextafter(jnp.ones((), dtype), jnp.zeros((), dtype))
  u0 = jnp.clip(lo + w * (hi - lo), 0, u_max)

  # Repair. u -> token is monotone in u, and so is the integer bit pattern
  # of a non-negative float, so bisect over bit patterns in a window around
  # u0 for both edges of the target's preimage [L, R) (L: first x with
  # tok(x) >= target; R: first with tok(x) > target), then clip u0 into it.
  # A u0 already inside is unchanged. One batched lookup per step keeps the
  # compiled program small.
  ibits = jnp.int32 if dtype == jnp.float32 else jnp.int64
  bits0 = lax.bitcast_convert_type(u0, ibits)
  max_bits = lax.bitcast_convert_type(u_max, ibits)
  first = jnp.broadcast_to(jnp.maximum(bits0 - _NUDGE_ULPS, 0), (2,) + u0.shape)
  end = jnp.broadcast_to(jnp.minimum(bits0 + _NUDGE_ULPS, max_bits) + 1,
                         first.shape)  # Exclusive; `end` = none found.
  thresh = jnp.stack([target, target + 1])

  def bisect(_, lo_hi):
    lo, hi = lo_hi
    mid = lo + (hi - lo) // 2
    ge = _lookup(tab, lax.bitcast_convert_type(mid, dtype)) >= thresh
    active = lo < hi
    return (jnp.where(active & ~ge, mid + 1, lo),
            jnp.where(active & ge, mid, hi))

  n_iter = int(np.ceil(np.log2(2 * _NUDGE_ULPS + 2)))
  edges, _ = lax.fori_loop(0, n_iter, bisect, (first, end))
  left, right = edges[0], edges[1]
  bits = jnp.where(left < right, jnp.clip(bits0, left, right - 1), bits0)
  return lax.bitcast_convert_type(bits, dtype)


# --------------------------------------------------------------------------
# Public sampling API.
# --------------------------------------------------------------------------


def inverse_cdf(logits, u, *, temperature=1.0, precision='auto'):
  """Samples tokens by inverse CDF: the smallest v with F(v) >= u.

  Let q(v) = exp((l_v - max l) / temperature) evaluated in the working
  precision, Z = sum_v q(v) and F(v) = sum_{w <= v} q(w) / Z (vocabulary-id
  order). The result is

      the smallest v with q(v) > 0 and F(v) >= u,

  or, if rounding leaves no such v (u within an ulp of 1), the last v with
  q(v) > 0. For u > 0 this is the textbook "smallest v with F(v) >= u" (a
  zero-mass token never first reaches u) and equals the count of v with
  F(v) < u when no token has zero mass. The q(v) > 0 clause makes u = 0
  return the first positive-probability token. So a token with zero mass in
  the working precision (logit -inf, or exp underflow) is never returned for
  any u in [0, 1), and the result is always < V. A u exactly on a step,
  u = F(v), returns v. Values outside [0, 1) are not checked (see
  `check_noise`): u < 0 acts like 0, u >= 1 like nextafter(1, 0). Rows with
  no positive mass (all -inf) return 0. Logits must be finite or -inf.

  Args:
    logits: (..., V) logits of any float dtype.
    u: uniform noise in [0, 1), shape broadcastable with logits.shape[:-1];
      a u batch larger than the logits batch (e.g. logits (B, 1, V) with u
      (B, S)) reuses the per-row tables at O(V / K + K) cost per u.
    temperature: > 0, scalar or broadcastable to logits.shape[:-1]; divides
      the logits. Greedy decoding is a separate argmax.
    precision: 'float64' (needs jax_enable_x64), 'float32' (blocked
      double-word path, accurate on TPU), or 'auto' (float64 iff x64 is on).

  Returns:
    int32 token ids, shape broadcast(logits.shape[:-1], u.shape).
  """
  dtype = working_dtype(precision)
  _common.check_temperature(temperature)
  return _inverse_cdf_jit(logits, u, temperature, dtype)


def uniform_interval(logits, tokens, *, temperature=1.0, precision='auto'):
  """The CDF interval of each token, for noise inversion.

  Token v is returned by `inverse_cdf` for u in (F(v-1), F(v)] (plus u = 0
  for the first positive-probability token), up to rounding at the ends.

  Args:
    logits: (..., V) logits.
    tokens: int ids, shape broadcastable with logits.shape[:-1].
    temperature: as in `inverse_cdf`.
    precision: as in `inverse_cdf`.

  Returns:
    (lo, hi) = (F(v-1), F(v)) in the working dtype, within [0, 1]; lo == hi
    for zero-probability tokens.
  """
  dtype = working_dtype(precision)
  _common.check_temperature(temperature)
  return _interval_jit(logits, tokens, temperature, dtype)


def sample_u_in_interval(rng, logits, tokens, *, temperature=1.0,
                         precision='auto'):
  """Noise u, uniform in each token's CDF interval, that maps back to it.

  u = lo + w * (hi - lo) with w ~ U(0, 1). Rounding can put such a u an ulp
  or two outside the set {u : inverse_cdf(logits, u) == token}; then u is
  moved to the nearest float (within 64 ulps) in that set. This guarantees
  inverse_cdf(logits, u, temperature=..., precision=...) == tokens for the
  same arguments, provided the token has positive mass and its interval
  contains at least one float of the working dtype (in float32 a token with
  probability << 6e-8 * F(v) can be unreachable; any u then misses it and
  the unrepaired u is returned).

  Args:
    rng: a jax PRNG key.
    logits: (..., V) logits.
    tokens: int ids, shape broadcastable with logits.shape[:-1].
    temperature: as in `inverse_cdf`.
    precision: as in `inverse_cdf`.

  Returns:
    u of the working dtype in [0, 1), shape broadcast(batch, tokens.shape).
  """
  dtype = working_dtype(precision)
  _common.check_temperature(temperature)
  return _sample_u_jit(rng, logits, tokens, temperature, dtype)


def check_noise(u) -> None:
  """Host-side check that every u is finite and in [0, 1).

  Meant for concrete arrays before compute (jitted code can't raise).

  Args:
    u: array-like noise.

  Raises:
    ValueError: naming the first offending value and the min / max.
    TypeError: if u is a tracer (call this outside jit).
  """
  try:
    arr = np.asarray(u)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError) as err:
    raise TypeError('check_noise needs a concrete array; call it outside '
                    'jit') from err
  if arr.size == 0:
    return
  arr = arr.astype(np.float64) if arr.dtype.kind in 'biu' else arr
  bad = _common.outside_unit_interval(arr)
  if not bad.any():
    return
  idx = np.unravel_index(np.argmax(bad), arr.shape)
  where = f"[{', '.join(str(int(i)) for i in idx)}]" if arr.ndim else ''
  finite = arr[np.isfinite(arr)]
  span = (f'min={float(finite.min())}, max={float(finite.max())} over finite '
          'values' if finite.size else 'no finite values')
  n_nonfinite = arr.size - finite.size
  raise ValueError(
      f'noise u must be finite and in [0, 1), but {int(bad.sum())} of '
      f'{arr.size} values are not: first u{where}={float(arr[idx])}; '
      f'{span}; {n_nonfinite} non-finite')


# The student's sampled readout (DecodeSpec.readout='sample') draws its
# token with the bits of u below 1 / FINE_NOISE_SCALE. Its noise encoder's
# fastest feature has period 1 / model.noise_scale (1/1000 by default), but
# trained students resolve u far more coarsely (on the demo, slot 1 emits
# about 11 distinct tokens over a 1024-point u grid where the teacher's
# map has 304), so these bits are fresh randomness to them: the draw
# follows the student's own softmax (an assumption, not checked: a
# student that resolved u to ~1/1024 would partly see its own draw).
# jax.random.uniform's float32 u carries 23 random bits, which leaves 13
# for it.
FINE_NOISE_SCALE = 1024.0


def fine_uniform(u):
  """frac(u * FINE_NOISE_SCALE): a second uniform in [0, 1) made from the
  low bits of u, exact in float32 (the scale is a power of two)."""
  x = jnp.asarray(u, jnp.float32) * FINE_NOISE_SCALE
  return x - jnp.floor(x)


# The median readout (DecodeSpec.readout='median') takes the inverse CDF of
# the student's softmax at this point: the token at its median.
MEDIAN_UNIFORM = 0.5


def readout_uniform(readout: str, u):
  """Where a student's non-argmax readout (decode.READOUTS) evaluates the
  inverse CDF of its softmax: `fine_uniform(u)` for 'sample', 0.5 for
  'median'; float32, u's shape."""
  if readout == 'sample':
    return fine_uniform(u)
  if readout == 'median':
    return jnp.full(jnp.shape(u), MEDIAN_UNIFORM, jnp.float32)
  raise ValueError(f"readout={readout!r} has no uniform: 'sample' or "
                   "'median'")


# --------------------------------------------------------------------------
# Noise features and encoder.
# --------------------------------------------------------------------------


def sinusoidal_features(x, dim: int, *, max_period: float = 10000.0):
  """Sinusoidal embedding [cos(2 pi x f_j), sin(2 pi x f_j)], j < dim / 2.

  f_j = max_period^(-j / (dim/2)), so f_0 = 1 and f_j decreases. The phase x
  f_j is reduced mod 1 before multiplying by 2 pi: this keeps the argument of
  sin/cos in [-pi, pi], where it is accurate, whatever the size of x f_j. In
  float64 (x64 on) that is all. In float32 the product x f_j is formed
  exactly as a double word (and f_j itself as hi + lo), and the reduction
  subtracts the nearest integer from the hi word, which is exact; so the
  phase error stays about one ulp of the fractional phase, rather than
  |x f_j| * 2^-24 as for a naive 2 pi x f_j. For u in [0, 1) the phase is at
  most one turn, and features of u and u + 1e-6 differ by up to ~6e-6, well
  above float32 resolution, even near u = 1.

  Args:
    x: (...) float values.
    dim: even feature size.
    max_period: the base of the frequency ladder.

  Returns:
    (..., dim) float32 features.
  """
  if dim <= 0 or dim % 2:
    raise ValueError(f'dim={dim} must be a positive even number')
  half = dim // 2
  freqs = max_period ** (-np.arange(half, dtype=np.float64) / half)
  x = jnp.asarray(x)
  if jax.config.jax_enable_x64:
    ph = x.astype(jnp.float64)[..., None] * jnp.asarray(freqs)
    ph = ph - jnp.round(ph)
  else:
    f_hi = freqs.astype(np.float32)
    f_lo = (freqs - f_hi).astype(np.float32)
    x = x.astype(jnp.float32)[..., None]
    p, e = _two_prod(x, jnp.asarray(f_hi))
    ph = (p - jnp.round(p)) + (e + x * f_lo)
  ang = (2 * np.pi) * ph
  return jnp.concatenate([jnp.cos(ang), jnp.sin(ang)],
                         axis=-1).astype(jnp.float32)


def noise_encoder_num_params(d_model: int, feature_dim: int = 256,
                             mlp_dim: int = 0) -> int:
  """Parameter count of `NoiseEncoder` with these fields.

  With d_model=768, feature_dim=768, mlp_dim=3072 this is 5,904,384 (the
  ~5.9M of the paper's width-768 encoder).
  """
  m = mlp_dim or 2 * d_model
  return ((2 * feature_dim + 1) * d_model  # in_proj
          + 2 * d_model  # LayerNorm scale and bias
          + (d_model + 1) * m  # mlp_in
          + (m + 1) * d_model)  # mlp_out


class NoiseEncoder(nn.Module):
  """Embeds noise u (and a temperature tau) into a d_model vector.

  features(u) ++ features(tau) -> Dense(d_model) = x -> x + MLP(LN(x)),
  MLP = Dense(mlp_dim) -> GELU -> Dense(d_model). No output LayerNorm.

  The input projection and the residual stream stay in float32 whatever
  `dtype` is: nearby u differ by ~1e-6 in their features, which bfloat16
  (8 mantissa bits) or a default-precision TPU matmul would erase. The
  MLP branch computes in `dtype`; the output is cast to `dtype`.

  Attributes:
    d_model: output width.
    feature_dim: sinusoidal feature size per input (even).
    mlp_dim: hidden width of the MLP; 0 means 2 * d_model.
    dtype: compute dtype of the MLP branch and of the output.
  """
  d_model: int
  feature_dim: int = 256
  mlp_dim: int = 0
  dtype: Any = jnp.float32
  # Ours: u is multiplied by `scale` before the features, so frequencies run
  # from `scale` turns over [0, 1) down to scale / max_period. With scale 1
  # the fastest feature makes one turn and nearby u are nearly identical
  # to the network; a larger scale lets it resolve narrow CDF intervals.
  scale: float = 1.0

  @nn.compact
  def __call__(self, u, tau=None):
    """u: (...) noise; tau: scalar or (...), default 1.0. -> (..., d_model)."""
    u = jnp.asarray(u)
    tau = jnp.ones((), jnp.float32) if tau is None else jnp.asarray(tau)
    shape = jnp.broadcast_shapes(u.shape, tau.shape)
    feats = jnp.concatenate([
        sinusoidal_features(jnp.broadcast_to(u, shape) * self.scale,
                            self.feature_dim),
        sinusoidal_features(jnp.broadcast_to(tau, shape), self.feature_dim),
    ], axis=-1)
    x = nn.Dense(self.d_model, dtype=jnp.float32,
                 precision=lax.Precision.HIGHEST, name='in_proj')(feats)
    h = nn.LayerNorm(dtype=self.dtype, name='mlp_norm')(x)
    h = nn.Dense(self.mlp_dim or 2 * self.d_model, dtype=self.dtype,
                 name='mlp_in')(h)
    h = nn.Dense(self.d_model, dtype=self.dtype, name='mlp_out')(nn.gelu(h))
    return (x + h.astype(jnp.float32)).astype(self.dtype)
