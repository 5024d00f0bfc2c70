"""Greedy decoding head: argmax_v (h @ W - penalty * counts) without (M, V).

Three implementations with identical results (ties go to the lowest index,
like `jnp.argmax`, also across vocab blocks):

* `_argmax_pallas`: Pallas kernel over a (row blocks, vocab blocks) grid; the
  vocab axis is the innermost sequential reduction and the running max/index
  live in the (resident) output blocks.
* `_argmax_chunked`: XLA loop over vocab chunks with the same running
  reduction; the CPU (and GPU) default.
* `_argmax_reference`: plain matmul + `jnp.argmax`.

NaN logits are not supported: the reference returns the NaN's index, and
the blockwise variants skip the NaN's whole vocabulary block, its largest
logit included.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kforcing_jax.kernels import _common

_NAME = 'projected_argmax'
_DEFAULT_BLOCK_V = 1024


def _penalized(logits_MxV, counts_MxV, penalty):
  """The one expression for penalised logits, shared by all variants."""
  if counts_MxV is None:
    return logits_MxV
  return logits_MxV - penalty * counts_MxV.astype(jnp.float32)


def _argmax_reference(h_MxD, w_DxV, counts_MxV, penalty):
  logits_MxV = _common.projection_logits(h_MxD, w_DxV)
  logits_MxV = _penalized(logits_MxV, counts_MxV, penalty)
  return jnp.argmax(logits_MxV, axis=1).astype(jnp.int32)


def _argmax_chunked(h_MxD, w_DxV, counts_MxV, penalty, block_v):
  m, _, v = _common.check_projection(_NAME, h_MxD, w_DxV)
  chunk = _common.chunk_size(_NAME, v, block_v)

  def body(carry, start, size):
    best_Mx1, idx_Mx1 = carry
    w_DxC = lax.dynamic_slice_in_dim(w_DxV, start, size, axis=1)
    counts_MxC = None
    if counts_MxV is not None:
      counts_MxC = lax.dynamic_slice_in_dim(counts_MxV, start, size, axis=1)
    logits_MxC = _penalized(_common.projection_logits(h_MxD, w_DxC),
                            counts_MxC, penalty)
    col_MxC = start + lax.broadcasted_iota(jnp.int32, logits_MxC.shape, 1)
    blk_max_Mx1, blk_idx_Mx1 = _common.block_argmax(logits_MxC, col_MxC)
    # Strict '>' keeps the earlier chunk on ties: lowest index wins.
    better_Mx1 = blk_max_Mx1 > best_Mx1
    return (jnp.where(better_Mx1, blk_max_Mx1, best_Mx1),
            jnp.where(better_Mx1, blk_idx_Mx1, idx_Mx1))

  init = (jnp.full((m, 1), -jnp.inf, jnp.float32),
          jnp.zeros((m, 1), jnp.int32))
  _, idx_Mx1 = _common.scan_vocab(body, init, v, chunk)
  return idx_Mx1[:, 0]


def _argmax_kernel(*refs, vocab_size, block_v, has_counts):
  """One (row block i, vocab block j) step of the running argmax."""
  if has_counts:
    penalty_ref, h_ref, w_ref, counts_ref, idx_ref, best_ref = refs
  else:
    h_ref, w_ref, idx_ref, best_ref = refs
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    best_ref[...] = jnp.full(best_ref.shape, -jnp.inf, jnp.float32)
    idx_ref[...] = jnp.zeros(idx_ref.shape, jnp.int32)

  logits_MxV = _common.projection_logits(h_ref[...], w_ref[...])
  if has_counts:
    logits_MxV = _penalized(logits_MxV, counts_ref[...], penalty_ref[0, 0])
  col_MxV = j * block_v + lax.broadcasted_iota(jnp.int32, logits_MxV.shape, 1)
  # Padded vocab columns can never win (a valid column ties them at worst,
  # and the lower index wins ties).
  logits_MxV = jnp.where(col_MxV < vocab_size, logits_MxV, -jnp.inf)
  blk_max_Mx1, blk_idx_Mx1 = _common.block_argmax(logits_MxV, col_MxV)
  best_Mx1 = best_ref[...]
  better_Mx1 = blk_max_Mx1 > best_Mx1
  best_ref[...] = jnp.where(better_Mx1, blk_max_Mx1, best_Mx1)
  idx_ref[...] = jnp.where(better_Mx1, blk_idx_Mx1, idx_ref[...])


def _argmax_pallas(h_MxD, w_DxV, counts_MxV, penalty, block_m, block_v,
                   interpret):
  m, d, v = _common.check_projection(_NAME, h_MxD, w_DxV)
  bm, bv, m_pad, v_pad = _common.pallas_blocks(_NAME, m, v, h_MxD.dtype,
                                               block_m, block_v,
                                               _DEFAULT_BLOCK_V)
  has_counts = counts_MxV is not None
  h_pad = _common.pad_axis(h_MxD, 0, m_pad)
  w_pad = _common.pad_axis(w_DxV, 1, v_pad)
  operands = [h_pad, w_pad]
  in_specs = [
      pl.BlockSpec((bm, d), lambda i, j: (i, 0)),
      pl.BlockSpec((d, bv), lambda i, j: (0, j)),
  ]
  if has_counts:
    counts_pad = _common.pad_axis(_common.pad_axis(counts_MxV, 0, m_pad), 1,
                                  v_pad)
    penalty_1x1 = jnp.asarray(penalty, jnp.float32).reshape(1, 1)
    operands = [penalty_1x1] + operands + [counts_pad]
    in_specs = ([_common.scalar_spec(interpret)] + in_specs +
                [pl.BlockSpec((bm, bv), lambda i, j: (i, j))])
  row_spec = pl.BlockSpec((bm, 1), lambda i, j: (i, 0))
  kernel = functools.partial(_argmax_kernel, vocab_size=v, block_v=bv,
                             has_counts=has_counts)
  idx_Mx1, _ = pl.pallas_call(
      kernel,
      grid=(m_pad // bm, v_pad // bv),
      in_specs=in_specs,
      out_specs=[row_spec, row_spec],
      out_shape=[
          jax.ShapeDtypeStruct((m_pad, 1), jnp.int32),
          jax.ShapeDtypeStruct((m_pad, 1), jnp.float32),
      ],
      compiler_params=_common.compiler_params(interpret),
      interpret=interpret,
      name='projected_argmax',
  )(*operands)
  return idx_Mx1[:m, 0]


def projected_argmax(h_MxD: jax.Array,
                     w_DxV: jax.Array,
                     *,
                     counts_MxV: jax.Array | None = None,
                     penalty: float | jax.Array = 0.0,
                     impl: _common.KernelImpl = 'auto',
                     block_m: int | None = None,
                     block_v: int | None = None,
                     interpret: bool | None = None) -> jax.Array:
  """Row-wise argmax of `h @ w - penalty * counts` without forming (M, V).

  Args:
    h_MxD: Hidden states, float32 or bfloat16.
    w_DxV: Unembedding matrix (no bias), float32 or bfloat16. Logits are
      accumulated in float32.
    counts_MxV: Optional int32 token counts for a frequency penalty.
    penalty: Frequency-penalty weight (ignored when `counts_MxV` is None).
    impl: 'auto' (Pallas on TPU, chunked elsewhere), 'pallas', 'reference' or
      'chunked'.
    block_m: Pallas row block (multiple of 8); ignored by other variants.
    block_v: Pallas vocab block (multiple of 128) or chunk size of the chunked
      variant; ignored by the reference.
    interpret: Pallas interpret mode; None means compiled on TPU and
      interpreted on CPU. Compiled Pallas is TPU-only (NotImplementedError on
      GPU).

  Returns:
    int32 (M,) indices; ties go to the lowest index, as in `jnp.argmax`.

  Raises:
    ValueError: On an unknown `impl`, inconsistent shapes or bad block sizes.
    TypeError: An input that is not an array (a Python list).
    NotImplementedError: For impl='pallas' compiled (not interpreted) on GPU.
  """
  impl = _common.resolve_impl(impl, _NAME)
  m, _, v = _common.check_projection(_NAME, h_MxD, w_DxV)
  if counts_MxV is not None:
    _common.check_rows(_NAME, 'counts', counts_MxV, (m, v))
  if impl == 'reference':
    return _argmax_reference(h_MxD, w_DxV, counts_MxV, penalty)
  if impl == 'chunked':
    return _argmax_chunked(h_MxD, w_DxV, counts_MxV, penalty, block_v)
  return _argmax_pallas(h_MxD, w_DxV, counts_MxV, penalty, block_m, block_v,
                        _common.resolve_interpret(_NAME, interpret))
