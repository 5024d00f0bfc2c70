"""Inverse-CDF sampling head over softmax(h @ W / tau) without (M, V).

Semantics (shared by every implementation): in float32, z = logits / tau,
e_v = exp(z_v - max z), c_v = sum_{v' <= v} e_v' in vocabulary-id order,
total = sum e. The sample for uniform u in [0, 1) is the number of v with
c_v < u * total, i.e. the smallest v with F(v) >= u. Comparing against the
unnormalised running sum keeps normalisation rounding from moving boundaries.
The result is clipped into [first, last] token with e_v > 0, so a
zero-probability token (logit -inf) is never returned and u = 0 gives the
first token with nonzero probability. Rows without any finite logit give 0.

Implementations agree exactly except where u * total lies within float
rounding (a few ulps) of a CDF step, where summation order decides:

* `_inverse_cdf_pallas`: two Pallas passes over (row blocks, vocab blocks):
  an online max / sum-of-exp normaliser, then a search pass that carries the
  running CDF and counts entries below u * total.
* `_inverse_cdf_chunked`: the same two passes as XLA loops over vocab chunks.
* `_inverse_cdf_reference`: full logits + `jnp.cumsum`.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kforcing_jax.kernels import _common

_NAME = 'projected_inverse_cdf'
# The in-kernel prefix sum costs block_v**2 per row, so keep this block small.
_DEFAULT_BLOCK_V = 512


def _scaled_logits(h_MxD, w_DxV, temperature):
  """The one expression for z = logits / tau, shared by all variants."""
  return _common.projection_logits(h_MxD, w_DxV) / temperature


def _finish(count_M, first_M, last_M, has_mass_M):
  """Clips the count into the nonzero-probability range."""
  idx_M = jnp.clip(count_M, first_M, last_M)
  return jnp.where(has_mass_M, idx_M, 0).astype(jnp.int32)


def _inverse_cdf_reference(h_MxD, w_DxV, u_M, temperature):
  z_MxV = _scaled_logits(h_MxD, w_DxV, temperature)
  max_Mx1 = _common.safe_max(jnp.max(z_MxV, axis=1, keepdims=True))
  e_MxV = jnp.exp(z_MxV - max_Mx1)
  cdf_MxV = jnp.cumsum(e_MxV, axis=1)
  target_Mx1 = u_M[:, None] * cdf_MxV[:, -1:]
  count_M = jnp.sum(cdf_MxV < target_Mx1, axis=1, dtype=jnp.int32)
  nonzero_MxV = e_MxV > 0
  v = z_MxV.shape[1]
  first_M = jnp.argmax(nonzero_MxV, axis=1)
  last_M = v - 1 - jnp.argmax(nonzero_MxV[:, ::-1], axis=1)
  return _finish(count_M, first_M, last_M, jnp.any(nonzero_MxV, axis=1))


def _online_normaliser_update(max_Mx1, sum_Mx1, z_MxV):
  """Online (max, sum exp(z - max)) update with one block of z."""
  new_max_Mx1 = jnp.maximum(max_Mx1, jnp.max(z_MxV, axis=1, keepdims=True))
  safe_Mx1 = _common.safe_max(new_max_Mx1)
  sum_Mx1 = (sum_Mx1 * jnp.exp(max_Mx1 - safe_Mx1) +
             jnp.sum(jnp.exp(z_MxV - safe_Mx1), axis=1, keepdims=True))
  return new_max_Mx1, sum_Mx1


def _search_update(carry, e_MxV, cdf_MxV, col_MxV, target_Mx1):
  """Counts CDF entries below target and tracks the nonzero-mass range."""
  count_Mx1, first_Mx1, last_Mx1 = carry
  count_Mx1 = count_Mx1 + jnp.sum(
      (cdf_MxV < target_Mx1).astype(jnp.int32), axis=1, keepdims=True)
  nonzero_MxV = e_MxV > 0
  first_Mx1 = jnp.minimum(
      first_Mx1,
      jnp.min(jnp.where(nonzero_MxV, col_MxV, _common.INT32_MAX), axis=1,
              keepdims=True))
  last_Mx1 = jnp.maximum(
      last_Mx1,
      jnp.max(jnp.where(nonzero_MxV, col_MxV, -1), axis=1, keepdims=True))
  return count_Mx1, first_Mx1, last_Mx1


def _inverse_cdf_chunked(h_MxD, w_DxV, u_M, temperature, block_v):
  m, _, v = _common.check_projection(_NAME, h_MxD, w_DxV)
  chunk = _common.chunk_size(_NAME, v, block_v)

  def z_chunk(start, size):
    w_DxC = lax.dynamic_slice_in_dim(w_DxV, start, size, axis=1)
    return _scaled_logits(h_MxD, w_DxC, temperature)

  def normaliser_body(carry, start, size):
    return _online_normaliser_update(*carry, z_chunk(start, size))

  max_Mx1, total_Mx1 = _common.scan_vocab(
      normaliser_body, (jnp.full((m, 1), -jnp.inf, jnp.float32),
                        jnp.zeros((m, 1), jnp.float32)), v, chunk)
  safe_Mx1 = _common.safe_max(max_Mx1)
  target_Mx1 = u_M[:, None] * total_Mx1

  def search_body(carry, start, size):
    prefix_Mx1, stats = carry
    e_MxC = jnp.exp(z_chunk(start, size) - safe_Mx1)
    cdf_MxC = prefix_Mx1 + jnp.cumsum(e_MxC, axis=1)
    col_MxC = start + lax.broadcasted_iota(jnp.int32, e_MxC.shape, 1)
    stats = _search_update(stats, e_MxC, cdf_MxC, col_MxC, target_Mx1)
    return cdf_MxC[:, -1:], stats

  init = (jnp.zeros((m, 1), jnp.float32),
          (jnp.zeros((m, 1), jnp.int32),
           jnp.full((m, 1), _common.INT32_MAX, jnp.int32),
           jnp.full((m, 1), -1, jnp.int32)))
  _, (count_Mx1, first_Mx1, last_Mx1) = _common.scan_vocab(
      search_body, init, v, chunk)
  return _finish(count_Mx1[:, 0], first_Mx1[:, 0], last_Mx1[:, 0],
                 last_Mx1[:, 0] >= 0)


def _normaliser_kernel(tau_ref, h_ref, w_ref, max_ref, sum_ref, *, vocab_size,
                       block_v):
  """Pass 1 step: online max and sum of exp over vocab block j."""
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    max_ref[...] = jnp.full(max_ref.shape, -jnp.inf, jnp.float32)
    sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)

  z_MxV = _scaled_logits(h_ref[...], w_ref[...], tau_ref[0, 0])
  col_MxV = j * block_v + lax.broadcasted_iota(jnp.int32, z_MxV.shape, 1)
  # -inf padding adds no mass and never sets the max.
  z_MxV = jnp.where(col_MxV < vocab_size, z_MxV, -jnp.inf)
  max_ref[...], sum_ref[...] = _online_normaliser_update(
      max_ref[...], sum_ref[...], z_MxV)


def _search_kernel(tau_ref, h_ref, w_ref, max_ref, target_ref, count_ref,
                   first_ref, last_ref, prefix_ref, *, vocab_size, block_v):
  """Pass 2 step: running CDF over vocab block j, counting c_v < target."""
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    count_ref[...] = jnp.zeros(count_ref.shape, jnp.int32)
    first_ref[...] = jnp.full(first_ref.shape, _common.INT32_MAX, jnp.int32)
    last_ref[...] = jnp.full(last_ref.shape, -1, jnp.int32)
    prefix_ref[...] = jnp.zeros(prefix_ref.shape, jnp.float32)

  z_MxV = _scaled_logits(h_ref[...], w_ref[...], tau_ref[0, 0])
  col_MxV = j * block_v + lax.broadcasted_iota(jnp.int32, z_MxV.shape, 1)
  z_MxV = jnp.where(col_MxV < vocab_size, z_MxV, -jnp.inf)
  e_MxV = jnp.exp(z_MxV - _common.safe_max(max_ref[...]))
  # Mosaic has no cumsum; an upper-triangular ones matmul (full f32
  # precision) is the in-block prefix sum.
  row_VxV = lax.broadcasted_iota(jnp.int32, (block_v, block_v), 0)
  col_VxV = lax.broadcasted_iota(jnp.int32, (block_v, block_v), 1)
  upper_VxV = (row_VxV <= col_VxV).astype(jnp.float32)
  cdf_MxV = prefix_ref[...] + jnp.dot(
      e_MxV, upper_VxV, precision=lax.Precision.HIGHEST,
      preferred_element_type=jnp.float32)
  stats = _search_update((count_ref[...], first_ref[...], last_ref[...]),
                         e_MxV, cdf_MxV, col_MxV, target_ref[...])
  count_ref[...], first_ref[...], last_ref[...] = stats
  prefix_ref[...] = cdf_MxV[:, block_v - 1:]


def _inverse_cdf_pallas(h_MxD, w_DxV, u_M, temperature, block_m, block_v,
                        interpret):
  m, d, v = _common.check_projection(_NAME, h_MxD, w_DxV)
  bm, bv, m_pad, v_pad = _common.pallas_blocks(_NAME, m, v, h_MxD.dtype,
                                               block_m, block_v,
                                               _DEFAULT_BLOCK_V)
  h_pad = _common.pad_axis(h_MxD, 0, m_pad)
  w_pad = _common.pad_axis(w_DxV, 1, v_pad)
  tau_1x1 = jnp.asarray(temperature, jnp.float32).reshape(1, 1)
  grid = (m_pad // bm, v_pad // bv)
  in_specs = [
      _common.scalar_spec(interpret),
      pl.BlockSpec((bm, d), lambda i, j: (i, 0)),
      pl.BlockSpec((d, bv), lambda i, j: (0, j)),
  ]
  row_spec = pl.BlockSpec((bm, 1), lambda i, j: (i, 0))
  f32_rows = jax.ShapeDtypeStruct((m_pad, 1), jnp.float32)
  i32_rows = jax.ShapeDtypeStruct((m_pad, 1), jnp.int32)
  params = _common.compiler_params(interpret)

  max_Mx1, total_Mx1 = pl.pallas_call(
      functools.partial(_normaliser_kernel, vocab_size=v, block_v=bv),
      grid=grid,
      in_specs=in_specs,
      out_specs=[row_spec, row_spec],
      out_shape=[f32_rows, f32_rows],
      compiler_params=params,
      interpret=interpret,
      name='inverse_cdf_normaliser',
  )(tau_1x1, h_pad, w_pad)

  u_Mx1 = _common.pad_axis(u_M, 0, m_pad)[:, None]
  target_Mx1 = u_Mx1 * total_Mx1
  count_Mx1, first_Mx1, last_Mx1, _ = pl.pallas_call(
      functools.partial(_search_kernel, vocab_size=v, block_v=bv),
      grid=grid,
      in_specs=in_specs + [row_spec, row_spec],
      out_specs=[row_spec] * 4,
      out_shape=[i32_rows, i32_rows, i32_rows, f32_rows],
      compiler_params=params,
      interpret=interpret,
      name='inverse_cdf_search',
  )(tau_1x1, h_pad, w_pad, max_Mx1, target_Mx1)
  return _finish(count_Mx1[:m, 0], first_Mx1[:m, 0], last_Mx1[:m, 0],
                 last_Mx1[:m, 0] >= 0)


def projected_inverse_cdf(h_MxD: jax.Array,
                          w_DxV: jax.Array,
                          u_M: jax.Array,
                          *,
                          temperature: float | jax.Array = 1.0,
                          impl: _common.KernelImpl = 'auto',
                          block_m: int | None = None,
                          block_v: int | None = None,
                          interpret: bool | None = None) -> jax.Array:
  """Samples softmax(h @ w / temperature) per row by inverse CDF.

  Args:
    h_MxD: Hidden states, float32 or bfloat16.
    w_DxV: Unembedding matrix (no bias), float32 or bfloat16. Everything is
      computed in float32.
    u_M: Uniform numbers in [0, 1), one per row.
    temperature: tau > 0 (a scalar, concrete or traced).
    impl: 'auto' (Pallas on TPU, chunked elsewhere), 'pallas', 'reference' or
      'chunked'.
    block_m: Pallas row block (multiple of 8); ignored by other variants.
    block_v: Pallas vocab block (multiple of 128) or chunk size of the chunked
      variant; ignored by the reference.
    interpret: Pallas interpret mode; None means compiled on TPU and
      interpreted on CPU. Compiled Pallas is TPU-only (NotImplementedError on
      GPU).

  Returns:
    int32 (M,): the smallest v with F(v) >= u, restricted to tokens with
    nonzero probability (see the module docstring for exact semantics).

  Raises:
    ValueError: On an unknown `impl`, inconsistent shapes, concrete u
      outside [0, 1), a non-positive concrete temperature or bad block
      sizes.
    TypeError: An input that is not an array (a Python list).
    NotImplementedError: For impl='pallas' compiled (not interpreted) on GPU.
  """
  impl = _common.resolve_impl(impl, _NAME)
  m, _, _ = _common.check_projection(_NAME, h_MxD, w_DxV)
  _common.check_rows(_NAME, 'u', u_M, (m,))
  _common.check_uniforms(_NAME, 'u', u_M)  # Where readable.
  _common.check_temperature(temperature, f'{_NAME}: ')
  u_M = jnp.asarray(u_M, jnp.float32)
  if impl == 'reference':
    return _inverse_cdf_reference(h_MxD, w_DxV, u_M, temperature)
  if impl == 'chunked':
    return _inverse_cdf_chunked(h_MxD, w_DxV, u_M, temperature, block_v)
  return _inverse_cdf_pallas(h_MxD, w_DxV, u_M, temperature, block_m, block_v,
                             _common.resolve_interpret(_NAME, interpret))
