"""Fused unembedding projection + softmax cross-entropy without (M, V).

Per row: loss = logsumexp(h @ W) - (h @ W)[target], plus the argmax of the
logits (for accuracy). The blockwise variants are `jax.custom_vjp` functions
whose backward pass recomputes the logits block by block:
dlogits = g * (softmax - onehot), dh = dlogits @ W^T, dW = h^T @ dlogits.

* Pallas: a forward kernel over (row blocks, vocab blocks) carrying online
  logsumexp, target logit and running argmax; backward = two kernels, one
  reducing dh over vocab blocks, one reducing dW over row blocks.
* Chunked: XLA loops over vocab chunks (the CPU/GPU default).
* Reference: full logits and plain autodiff.

Targets must lie in [0, V). Concrete ones are checked; traced ones (the
usual case, under jit) are not, and the variants disagree on one outside
it (reference: -1 indexes the last column; chunked: the target logit
counts as 0).
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kforcing_jax.kernels import _common

_NAME = 'projected_cross_entropy'
# The dW kernel keeps a (d, block_v) f32 accumulator next to the (d, block_v)
# W block (both double-buffered): 512 keeps d = 768 well inside the 16 MiB
# default scoped VMEM.
_DEFAULT_BLOCK_V = 512


def _cross_entropy_reference(h_MxD, w_DxV, targets_M):
  logits_MxV = _common.projection_logits(h_MxD, w_DxV)
  lse_M = jax.nn.logsumexp(logits_MxV, axis=1)
  target_logit_M = jnp.take_along_axis(logits_MxV, targets_M[:, None],
                                       axis=1)[:, 0]
  return lse_M - target_logit_M, jnp.argmax(logits_MxV, axis=1).astype(
      jnp.int32)


def _forward_update(carry, logits_MxV, col_MxV, targets_Mx1):
  """Folds one vocab block into (max, sumexp, target logit, best, argmax)."""
  max_Mx1, sum_Mx1, tgt_Mx1, best_Mx1, idx_Mx1 = carry
  blk_max_Mx1, blk_idx_Mx1 = _common.block_argmax(logits_MxV, col_MxV)
  new_max_Mx1 = jnp.maximum(max_Mx1, blk_max_Mx1)
  safe_Mx1 = _common.safe_max(new_max_Mx1)
  sum_Mx1 = (sum_Mx1 * jnp.exp(max_Mx1 - safe_Mx1) +
             jnp.sum(jnp.exp(logits_MxV - safe_Mx1), axis=1, keepdims=True))
  tgt_Mx1 = tgt_Mx1 + jnp.sum(
      jnp.where(col_MxV == targets_Mx1, logits_MxV, 0.0), axis=1,
      keepdims=True)
  # Strict '>' keeps the earlier block on ties: lowest index wins.
  better_Mx1 = blk_max_Mx1 > best_Mx1
  best_Mx1 = jnp.where(better_Mx1, blk_max_Mx1, best_Mx1)
  idx_Mx1 = jnp.where(better_Mx1, blk_idx_Mx1, idx_Mx1)
  return new_max_Mx1, sum_Mx1, tgt_Mx1, best_Mx1, idx_Mx1


def _forward_init(m):
  neg_inf = jnp.full((m, 1), -jnp.inf, jnp.float32)
  zeros = jnp.zeros((m, 1), jnp.float32)
  return neg_inf, zeros, zeros, neg_inf, jnp.zeros((m, 1), jnp.int32)


def _dlogits(logits_MxV, col_MxV, targets_Mx1, lse_Mx1, g_Mx1, vocab_size):
  """g * (softmax - onehot); zero on padded vocab columns."""
  p_MxV = jnp.where(col_MxV < vocab_size, jnp.exp(logits_MxV - lse_Mx1), 0.0)
  return g_Mx1 * (p_MxV - (col_MxV == targets_Mx1).astype(jnp.float32))


def _finish_forward(max_Mx1, sum_Mx1, tgt_Mx1, idx_Mx1):
  lse_M = max_Mx1[:, 0] + jnp.log(sum_Mx1[:, 0])
  return lse_M - tgt_Mx1[:, 0], idx_Mx1[:, 0], lse_M


# ----------------------------------------------------------------- chunked --


def _chunked_forward(h_MxD, w_DxV, targets_M, block_v):
  m, _, v = _common.check_projection(_NAME, h_MxD, w_DxV)
  chunk = _common.chunk_size(_NAME, v, block_v)
  targets_Mx1 = targets_M[:, None]

  def body(carry, start, size):
    w_DxC = lax.dynamic_slice_in_dim(w_DxV, start, size, axis=1)
    logits_MxC = _common.projection_logits(h_MxD, w_DxC)
    col_MxC = start + lax.broadcasted_iota(jnp.int32, logits_MxC.shape, 1)
    return _forward_update(carry, logits_MxC, col_MxC, targets_Mx1)

  max_Mx1, sum_Mx1, tgt_Mx1, _, idx_Mx1 = _common.scan_vocab(
      body, _forward_init(m), v, chunk)
  return _finish_forward(max_Mx1, sum_Mx1, tgt_Mx1, idx_Mx1)


def _chunked_backward(h_MxD, w_DxV, targets_M, lse_M, g_M, block_v):
  _, _, v = _common.check_projection(_NAME, h_MxD, w_DxV)
  chunk = _common.chunk_size(_NAME, v, block_v)
  targets_Mx1, lse_Mx1, g_Mx1 = targets_M[:, None], lse_M[:, None], g_M[:, None]
  h_f32 = h_MxD.astype(jnp.float32)

  def body(carry, start, size):
    dh_MxD, dw_DxV = carry
    w_DxC = lax.dynamic_slice_in_dim(w_DxV, start, size, axis=1)
    logits_MxC = _common.projection_logits(h_MxD, w_DxC)
    col_MxC = start + lax.broadcasted_iota(jnp.int32, logits_MxC.shape, 1)
    dlogits_MxC = _dlogits(logits_MxC, col_MxC, targets_Mx1, lse_Mx1, g_Mx1,
                           v)
    dh_MxD = dh_MxD + lax.dot_general(
        dlogits_MxC, w_DxC.astype(jnp.float32), (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32)
    # Each dW chunk is complete (summed over all rows) once computed, so it
    # is written straight into a w-dtype buffer: no f32 (d, V) copy.
    dw_DxC = lax.dot_general(h_f32, dlogits_MxC, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    dw_DxV = lax.dynamic_update_slice_in_dim(dw_DxV, dw_DxC.astype(
        dw_DxV.dtype), start, axis=1)
    return dh_MxD, dw_DxV

  init = (jnp.zeros(h_MxD.shape, jnp.float32), jnp.zeros_like(w_DxV))
  dh_MxD, dw_DxV = _common.scan_vocab(body, init, v, chunk)
  return dh_MxD.astype(h_MxD.dtype), dw_DxV


# ------------------------------------------------------------------ pallas --


def _forward_kernel(h_ref, w_ref, targets_ref, max_ref, sum_ref, tgt_ref,
                    best_ref, idx_ref, *, vocab_size, block_v):
  """Forward step (row block i, vocab block j); outputs are accumulators."""
  j = pl.program_id(1)
  out_refs = (max_ref, sum_ref, tgt_ref, best_ref, idx_ref)

  @pl.when(j == 0)
  def _init():
    for ref, value in zip(out_refs, _forward_init(max_ref.shape[0])):
      ref[...] = value

  logits_MxV = _common.projection_logits(h_ref[...], w_ref[...])
  col_MxV = j * block_v + lax.broadcasted_iota(jnp.int32, logits_MxV.shape, 1)
  logits_MxV = jnp.where(col_MxV < vocab_size, logits_MxV, -jnp.inf)
  carry = tuple(ref[...] for ref in out_refs)
  new = _forward_update(carry, logits_MxV, col_MxV, targets_ref[...])
  for ref, value in zip(out_refs, new):
    ref[...] = value


def _dh_kernel(h_ref, w_ref, targets_ref, lse_ref, g_ref, dh_ref, *,
               vocab_size, block_v):
  """dh for row block i, reduced over vocab blocks j (grid axis 1)."""
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    dh_ref[...] = jnp.zeros(dh_ref.shape, jnp.float32)

  w_DxV = w_ref[...]
  logits_MxV = _common.projection_logits(h_ref[...], w_DxV)
  col_MxV = j * block_v + lax.broadcasted_iota(jnp.int32, logits_MxV.shape, 1)
  dlogits_MxV = _dlogits(logits_MxV, col_MxV, targets_ref[...], lse_ref[...],
                         g_ref[...], vocab_size)
  dh_ref[...] += lax.dot_general(
      dlogits_MxV, w_DxV.astype(jnp.float32), (((1,), (1,)), ((), ())),
      preferred_element_type=jnp.float32)


def _dw_kernel(h_ref, w_ref, targets_ref, lse_ref, g_ref, dw_ref, *,
               vocab_size, block_v):
  """dW for vocab block j (grid axis 0), reduced over row blocks i (axis 1)."""
  j, i = pl.program_id(0), pl.program_id(1)

  @pl.when(i == 0)
  def _init():
    dw_ref[...] = jnp.zeros(dw_ref.shape, jnp.float32)

  h_MxD = h_ref[...]
  logits_MxV = _common.projection_logits(h_MxD, w_ref[...])
  col_MxV = j * block_v + lax.broadcasted_iota(jnp.int32, logits_MxV.shape, 1)
  dlogits_MxV = _dlogits(logits_MxV, col_MxV, targets_ref[...], lse_ref[...],
                         g_ref[...], vocab_size)
  dw_ref[...] += lax.dot_general(
      h_MxD.astype(jnp.float32), dlogits_MxV, (((0,), (0,)), ((), ())),
      preferred_element_type=jnp.float32)


def _pallas_setup(h_MxD, w_DxV, cfg):
  m, d, v = _common.check_projection(_NAME, h_MxD, w_DxV)
  bm, bv, m_pad, v_pad = _common.pallas_blocks(_NAME, m, v, h_MxD.dtype,
                                               cfg.block_m, cfg.block_v,
                                               _DEFAULT_BLOCK_V)
  return m, d, v, bm, bv, m_pad, v_pad


def _pallas_forward(h_MxD, w_DxV, targets_M, cfg):
  m, d, v, bm, bv, m_pad, v_pad = _pallas_setup(h_MxD, w_DxV, cfg)
  row_spec = pl.BlockSpec((bm, 1), lambda i, j: (i, 0))
  f32_rows = jax.ShapeDtypeStruct((m_pad, 1), jnp.float32)
  outs = pl.pallas_call(
      functools.partial(_forward_kernel, vocab_size=v, block_v=bv),
      grid=(m_pad // bm, v_pad // bv),
      in_specs=[
          pl.BlockSpec((bm, d), lambda i, j: (i, 0)),
          pl.BlockSpec((d, bv), lambda i, j: (0, j)),
          row_spec,
      ],
      out_specs=[row_spec] * 5,
      out_shape=[f32_rows] * 4 +
      [jax.ShapeDtypeStruct((m_pad, 1), jnp.int32)],
      compiler_params=_common.compiler_params(cfg.interpret),
      interpret=cfg.interpret,
      name='cross_entropy_fwd',
  )(_common.pad_axis(h_MxD, 0, m_pad), _common.pad_axis(w_DxV, 1, v_pad),
    _common.pad_axis(targets_M, 0, m_pad)[:, None])
  max_Mx1, sum_Mx1, tgt_Mx1, _, idx_Mx1 = (x[:m] for x in outs)
  return _finish_forward(max_Mx1, sum_Mx1, tgt_Mx1, idx_Mx1)


def _pallas_backward(h_MxD, w_DxV, targets_M, lse_M, g_M, cfg):
  m, d, v, bm, bv, m_pad, v_pad = _pallas_setup(h_MxD, w_DxV, cfg)
  # Padded rows get g = 0, so they contribute nothing to dW.
  operands = (_common.pad_axis(h_MxD, 0, m_pad),
              _common.pad_axis(w_DxV, 1, v_pad),
              _common.pad_axis(targets_M, 0, m_pad)[:, None],
              _common.pad_axis(lse_M, 0, m_pad)[:, None],
              _common.pad_axis(g_M.astype(jnp.float32), 0, m_pad)[:, None])
  params = _common.compiler_params(cfg.interpret)
  kwargs = dict(vocab_size=v, block_v=bv)

  def specs(row_axis, vocab_axis):
    def rows(*ij):
      return (ij[row_axis], 0)

    def vocab(*ij):
      return (0, ij[vocab_axis])

    row_spec = pl.BlockSpec((bm, 1), rows)
    return [pl.BlockSpec((bm, d), rows), pl.BlockSpec((d, bv), vocab),
            row_spec, row_spec, row_spec], rows, vocab

  in_specs, rows, _ = specs(0, 1)
  dh_MxD = pl.pallas_call(
      functools.partial(_dh_kernel, **kwargs),
      grid=(m_pad // bm, v_pad // bv),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((bm, d), rows),
      out_shape=jax.ShapeDtypeStruct((m_pad, d), jnp.float32),
      compiler_params=params,
      interpret=cfg.interpret,
      name='cross_entropy_bwd_dh',
  )(*operands)

  # Vocab blocks outermost ('parallel'), row blocks the inner reduction.
  in_specs, _, vocab = specs(1, 0)
  dw_DxV = pl.pallas_call(
      functools.partial(_dw_kernel, **kwargs),
      grid=(v_pad // bv, m_pad // bm),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((d, bv), vocab),
      out_shape=jax.ShapeDtypeStruct((d, v_pad), jnp.float32),
      compiler_params=params,
      interpret=cfg.interpret,
      name='cross_entropy_bwd_dw',
  )(*operands)
  return (dh_MxD[:m].astype(h_MxD.dtype), dw_DxV[:, :v].astype(w_DxV.dtype))


# ------------------------------------------------------------- custom vjp --


def _blockwise_forward(h_MxD, w_DxV, targets_M, cfg):
  if cfg.impl == 'pallas':
    return _pallas_forward(h_MxD, w_DxV, targets_M, cfg)
  return _chunked_forward(h_MxD, w_DxV, targets_M, cfg.block_v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blockwise_cross_entropy(h_MxD, w_DxV, targets_M, cfg):
  loss_M, argmax_M, _ = _blockwise_forward(h_MxD, w_DxV, targets_M, cfg)
  return loss_M, argmax_M


def _blockwise_cross_entropy_fwd(h_MxD, w_DxV, targets_M, cfg):
  loss_M, argmax_M, lse_M = _blockwise_forward(h_MxD, w_DxV, targets_M, cfg)
  return (loss_M, argmax_M), (h_MxD, w_DxV, targets_M, lse_M)


def _blockwise_cross_entropy_bwd(cfg, residuals, cotangents):
  h_MxD, w_DxV, targets_M, lse_M = residuals
  g_M, _ = cotangents  # The argmax output is integer: no cotangent.
  if cfg.impl == 'pallas':
    dh_MxD, dw_DxV = _pallas_backward(h_MxD, w_DxV, targets_M, lse_M, g_M,
                                      cfg)
  else:
    dh_MxD, dw_DxV = _chunked_backward(h_MxD, w_DxV, targets_M, lse_M,
                                       g_M.astype(jnp.float32), cfg.block_v)
  return dh_MxD, dw_DxV, None


_blockwise_cross_entropy.defvjp(_blockwise_cross_entropy_fwd,
                                _blockwise_cross_entropy_bwd)


def projected_cross_entropy(
    h_MxD: jax.Array,
    w_DxV: jax.Array,
    targets_M: jax.Array,
    *,
    impl: _common.KernelImpl = 'auto',
    block_m: int | None = None,
    block_v: int | None = None,
    interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """Per-row cross-entropy of softmax(h @ w) against `targets`, fused.

  Differentiable (loss only) with respect to `h_MxD` and `w_DxV`; the
  blockwise variants never hold the (M, V) logits, not even in the backward
  pass, which recomputes them block by block.

  Args:
    h_MxD: Hidden states, float32 or bfloat16.
    w_DxV: Unembedding matrix (no bias), float32 or bfloat16. Logits are
      accumulated in float32.
    targets_M: int32 target ids in [0, V).
    impl: 'auto' (Pallas on TPU, chunked elsewhere), 'pallas', 'reference' or
      'chunked'.
    block_m: Pallas row block (multiple of 8); ignored by other variants.
    block_v: Pallas vocab block (multiple of 128) or chunk size of the chunked
      variant; ignored by the reference.
    interpret: Pallas interpret mode; None means compiled on TPU and
      interpreted on CPU. Compiled Pallas is TPU-only (NotImplementedError on
      GPU).

  Returns:
    (loss_M float32, argmax_M int32): logsumexp(logits) - logits[target] and
    the lowest index of the row maximum.

  Raises:
    ValueError: On an unknown `impl`, inconsistent shapes, non-integer
      targets, concrete targets outside [0, V) or bad block sizes.
    TypeError: An input that is not an array (a Python list).
    NotImplementedError: For impl='pallas' compiled (not interpreted) on GPU.
  """
  impl = _common.resolve_impl(impl, _NAME)
  m, _, v = _common.check_projection(_NAME, h_MxD, w_DxV)
  _common.check_rows(_NAME, 'targets', targets_M, (m,))
  if not jnp.issubdtype(targets_M.dtype, jnp.integer):
    raise ValueError(
        f'{_NAME}: targets must be integer, got dtype {targets_M.dtype}.')
  _common.check_ids(_NAME, 'targets', targets_M, v)  # Where readable.
  targets_M = targets_M.astype(jnp.int32)
  if impl == 'reference':
    return _cross_entropy_reference(h_MxD, w_DxV, targets_M)
  # Validate eagerly, outside the custom_vjp trace.
  if impl == 'pallas':
    cfg = _common.BlockConfig(impl, block_m, block_v,
                              _common.resolve_interpret(_NAME, interpret))
    _pallas_setup(h_MxD, w_DxV, cfg)
  else:
    _common.chunk_size(_NAME, w_DxV.shape[1], block_v)
    cfg = _common.BlockConfig(impl, None, block_v, False)
  return _blockwise_cross_entropy(h_MxD, w_DxV, targets_M, cfg)
