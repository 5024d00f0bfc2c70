"""Where the vocabulary projection meets the kernels: one switch, `impl`.

Decoding, the distillation loss and the stage-1 teacher targets call these
functions with hidden states and the unembedding matrix. `impl` is the
`kernels.impl` config value:
  'reference'  full logits (the model's own projection) then argmax /
               inverse CDF / softmax cross-entropy;
  'chunked'    XLA loop over vocabulary chunks, never the full logits
               (argmax and the loss; inverse CDF keeps noise.py's full
               high-precision tables, below);
  'pallas'     the Pallas kernels (interpret mode on CPU);
  'auto'       Pallas on TPU; elsewhere chunked for the training loss
               (its (M, V) logits are what costs memory) and reference for
               the argmax of decoding and of the self-forcing targets (a
               few rows of logits, or as many as the stage-1 inverse CDF
               builds anyway; one matmul is fastest on CPU:
               chunked measured 626 vs 816 AR tokens/s at batch 1, demo size).
Inverse-CDF sampling keeps the high-precision coupling of `noise.py`
(docs/METHOD.md: the authors use float64) unless precision='float32' is asked
for by name and the resolved implementation is Pallas (TPU): only then does
the f32 two-pass Pallas kernel sample, which avoids the (M, V) logits but
disagrees with the high-precision coupling on draws near a CDF step. 'auto'
never takes it, so on TPU it too builds the (M, V) float32 logits and
noise.py's tables. Decoding has no precision setting: it always samples
with 'auto'.
"""

import jax.numpy as jnp
import optax

from kforcing_jax import kernels
from kforcing_jax import noise as noise_lib
from kforcing_jax.kernels import _common

IMPLS = ('auto', 'pallas', 'chunked', 'reference')


def check_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f'kernels.impl={impl!r}; expected one of {IMPLS}')
  return impl


def resolved(impl: str, for_loss: bool = False) -> str:
  """The concrete implementation 'auto' stands for here (module docstring)."""
  check_impl(impl)
  if impl == 'auto' and _common.backend() != 'tpu':
    return 'chunked' if for_loss else 'reference'
  return _common.resolve_impl(impl, 'kernels.impl')


def logits(h_MxD, w_DxV):
  return _common.projection_logits(h_MxD, w_DxV)


def first_argmax(x_MxV):
  """jnp.argmax over the last axis (ties: lowest index), as two plain
  reductions, max then lowest index equal to it: on XLA:CPU about 2x faster
  than argmax's (value, index) reduction at decode sizes (64 x 4096: 0.27
  vs 0.47 ms). A row containing NaN gives index 0 (argmax: the first NaN).
  """
  v = x_MxV.shape[-1]
  best = jnp.max(x_MxV, axis=-1, keepdims=True)
  iota = jnp.arange(v, dtype=jnp.int32)
  idx = jnp.min(jnp.where(x_MxV == best, iota, v), axis=-1)
  return jnp.where(idx == v, 0, idx)


def penalised_argmax(logits_MxV, counts_MxV=None, penalty=0.0):
  """Greedy token per row of given logits, minus penalty * count if counts
  are given (the 'reference' path of `argmax`)."""
  if counts_MxV is not None:
    logits_MxV = logits_MxV - penalty * counts_MxV.astype(logits_MxV.dtype)
  return first_argmax(logits_MxV)


def argmax(h_MxD, w_DxV, impl, counts_MxV=None, penalty=0.0):
  """Greedy token per row (frequency-penalised when counts are given)."""
  impl = resolved(impl)
  if impl == 'reference':
    return penalised_argmax(logits(h_MxD, w_DxV), counts_MxV, penalty)
  return kernels.projected_argmax(h_MxD, w_DxV, counts_MxV=counts_MxV,
                                  penalty=penalty, impl=impl)


def inverse_cdf(h_MxD, w_DxV, u_M, impl, temperature=1.0, counts_MxV=None,
                penalty=0.0, precision='auto'):
  """Inverse-CDF token per row; see the module docstring for precision.

  The Pallas kernel works in plain float32, so only an explicit 'float32'
  request reaches it; 'auto' and 'float64' take the high-precision path. A
  bad precision is refused on every path.
  """
  noise_lib.working_dtype(precision)  # Validates it.
  if (resolved(impl) == 'pallas' and counts_MxV is None and
      precision == 'float32'):
    return kernels.projected_inverse_cdf(h_MxD, w_DxV, u_M,
                                         temperature=temperature,
                                         impl='pallas')
  lg = logits(h_MxD, w_DxV)
  if counts_MxV is not None:
    lg = lg - penalty * counts_MxV.astype(lg.dtype)
  return noise_lib.inverse_cdf(lg, u_M, temperature=temperature,
                               precision=precision)


def cross_entropy(h_MxD, w_DxV, targets_M, impl):
  """(per-row loss, per-row argmax); fused unless impl is 'reference'."""
  impl = resolved(impl, for_loss=True)
  if impl == 'reference':
    lg = logits(h_MxD, w_DxV)
    loss = optax.softmax_cross_entropy_with_integer_labels(lg, targets_M)
    return loss, jnp.argmax(lg, axis=-1).astype(jnp.int32)
  return kernels.projected_cross_entropy(h_MxD, w_DxV, targets_M, impl=impl)
