"""Helpers shared by the projected-reduction kernels.

Everything here is implementation plumbing: argument validation, choosing an
implementation for the current backend, block-size defaults that respect TPU
tiling, padding, and the vocab-chunk loop used by the chunked-XLA variants.
"""

from typing import Any, Callable, Literal, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

KernelImpl = Literal['auto', 'pallas', 'reference', 'chunked']
IMPLS = ('auto', 'pallas', 'reference', 'chunked')

# TPU vreg tile: (sublanes, lanes) for 32-bit dtypes.
SUBLANES = 8
LANES = 128
# Largest int32; used as "no index yet" in running minimums.
INT32_MAX = 2**31 - 1
# Default row block of the Pallas kernels (rows share one pass over W).
DEFAULT_BLOCK_M = 128
# Default vocab chunk of the chunked-XLA variants: large enough that the
# per-chunk matmul stays efficient, small enough that (M, chunk) is cheap.
DEFAULT_CHUNK_V = 2048


class BlockConfig(NamedTuple):
  """Static (hashable) implementation settings, e.g. for custom_vjp."""
  impl: str
  block_m: int | None
  block_v: int | None
  interpret: bool


def backend() -> str:
  """Platform of the default device ('cpu', 'gpu' or 'tpu')."""
  return jax.default_backend()


def resolve_impl(impl: str, fn_name: str) -> str:
  """Maps `impl` to 'pallas', 'reference' or 'chunked' for this backend.

  'auto' picks Pallas only on TPU. The kernels are written for TPU tiling and
  memory spaces and do not lower with Mosaic GPU (see `resolve_interpret`),
  so on GPU, as on CPU, 'auto' uses the chunked-XLA variant.

  Args:
    impl: One of 'auto', 'pallas', 'reference', 'chunked'.
    fn_name: Calling function's name, for the error message.

  Returns:
    The concrete implementation name.

  Raises:
    ValueError: If `impl` is not a known implementation.
  """
  if impl not in IMPLS:
    raise ValueError(
        f'{fn_name}: unknown impl {impl!r}; expected one of {IMPLS}.')
  if impl != 'auto':
    return impl
  return 'pallas' if backend() == 'tpu' else 'chunked'


def resolve_interpret(fn_name: str, interpret: bool | None) -> bool:
  """Interpret mode for impl='pallas'; defaults to on without a TPU.

  Args:
    fn_name: Calling function's name, for the error message.
    interpret: User setting; None picks compiled on TPU, interpreted on CPU.

  Returns:
    Whether to run the Pallas kernel in interpret mode.

  Raises:
    NotImplementedError: For compiled Pallas on GPU. Cross-lowering these
      kernels with Mosaic GPU fails (their (rows, 1) accumulator blocks and
      tile sizes do not fit its copy / shared-memory rules), so rather than a
      deep lowering error this says what to use instead.
  """
  if interpret is not None and not isinstance(interpret, (bool, np.bool_)):
    # A string such as 'no' would be truthy.
    raise ValueError(f'{fn_name}: interpret must be a bool or None, got '
                     f'{interpret!r}.')
  platform = backend()
  if interpret is None:
    interpret = platform not in ('tpu', 'gpu')
  if not interpret and platform == 'gpu':
    raise NotImplementedError(
        f"{fn_name}: the Pallas kernel targets TPU and has no GPU lowering; "
        f"use impl='chunked' (the GPU default) or interpret=True.")
  return bool(interpret)


def check_is_array(fn_name: str, arg_name: str, x) -> None:
  """A list or a scalar would otherwise fail deep inside with an
  AttributeError ('list' object has no attribute 'ndim')."""
  if not (hasattr(x, 'shape') and hasattr(x, 'dtype')):
    raise TypeError(
        f'{fn_name}: {arg_name} must be an array (numpy or jax), got '
        f'{type(x).__name__}; wrap it in jnp.asarray.')


def readable(x) -> bool:
  """Whether the host can read `x`'s values: not a tracer (under the
  caller's jit, where values are the caller's to check), a shape-only
  stand-in (jax.ShapeDtypeStruct) or a global array spread over other
  processes."""
  return not isinstance(x, jax.core.Tracer) and (
      isinstance(x, (int, float, np.number)) or hasattr(x, '__array__')
  ) and getattr(x, 'is_fully_addressable', True)


def as_number_array(x) -> np.ndarray | None:
  """`x` as a float64 numpy array if it holds numbers (ints or floats,
  bfloat16 included, not bools or strings), else None."""
  t = np.asarray(x)
  if jnp.issubdtype(t.dtype, jnp.bool_) or not (
      jnp.issubdtype(t.dtype, jnp.integer) or
      jnp.issubdtype(t.dtype, jnp.floating)):
    return None
  return t.astype(np.float64)


def check_ids(fn_name: str, arg_name: str, ids, v: int) -> None:
  """Refuses concrete ids outside [0, V): the variants would each read
  them differently (an inf, a NaN, a wrapped index), none an error."""
  if not readable(ids):
    return
  arr = np.asarray(ids)
  bad = (arr < 0) | (arr >= v)
  if bad.any():
    i = int(np.argmax(bad.reshape(-1)))
    raise ValueError(
        f'{fn_name}: {arg_name} must be in [0, V={v}), got '
        f'{int(arr.reshape(-1)[i])} at row {i}.')


def outside_unit_interval(x) -> np.ndarray:
  """Mask of the values of `x` (host numbers) that no uniform u may be:
  not finite, or outside [0, 1)."""
  arr = np.asarray(x, np.float64)
  with np.errstate(invalid='ignore'):
    return ~(np.isfinite(arr) & (arr >= 0) & (arr < 1))


def check_uniforms(fn_name: str, arg_name: str, u) -> None:
  """Refuses concrete u outside [0, 1) or non-finite: every variant would
  clamp it silently to the first or last token."""
  if not readable(u):
    return
  arr = np.asarray(u, np.float64)
  bad = outside_unit_interval(arr)
  if bad.any():
    i = int(np.argmax(bad.reshape(-1)))
    raise ValueError(
        f'{fn_name}: {arg_name} must be finite and in [0, 1), got '
        f'{float(arr.reshape(-1)[i])} at row {i}.')


def check_projection(fn_name: str, h_MxD: jax.Array, w_DxV: jax.Array):
  """Validates `h (M, d) @ w (d, V)`; returns (M, d, V)."""
  check_is_array(fn_name, 'h', h_MxD)
  check_is_array(fn_name, 'w', w_DxV)
  if h_MxD.ndim != 2 or w_DxV.ndim != 2 or h_MxD.shape[1] != w_DxV.shape[0]:
    raise ValueError(
        f'{fn_name}: expected h of shape (M, d) and w of shape (d, V), got '
        f'h.shape={tuple(h_MxD.shape)} and w.shape={tuple(w_DxV.shape)}.')
  if not jnp.issubdtype(h_MxD.dtype, jnp.floating) or not jnp.issubdtype(
      w_DxV.dtype, jnp.floating):
    raise ValueError(
        f'{fn_name}: h and w must be floating point, got {h_MxD.dtype} and '
        f'{w_DxV.dtype}.')
  m, d = h_MxD.shape
  v = w_DxV.shape[1]
  if m == 0 or v == 0:
    raise ValueError(
        f'{fn_name}: need M >= 1 and V >= 1, got h.shape={tuple(h_MxD.shape)} '
        f'and w.shape={tuple(w_DxV.shape)}.')
  return m, d, v


def check_rows(fn_name: str, arg_name: str, x: jax.Array, shape: tuple[int,
                                                                        ...]):
  """Raises ValueError naming both shapes unless `x.shape == shape`."""
  check_is_array(fn_name, arg_name, x)
  if tuple(x.shape) != tuple(shape):
    raise ValueError(
        f'{fn_name}: expected {arg_name} of shape {tuple(shape)}, got '
        f'{arg_name}.shape={tuple(x.shape)}.')


def check_temperature(temperature, prefix: str = '') -> None:
  """Raises if a concrete temperature (Python, numpy or JAX) is not > 0;
  traced values pass, the caller's to check."""
  try:
    t = np.asarray(temperature)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return
  t = as_number_array(t)
  if t is None:
    raise ValueError(f'{prefix}temperature must be a number > 0, got '
                     f'{temperature!r}')
  if not np.all(t > 0):
    raise ValueError(
        f'{prefix}temperature must be > 0, got {temperature!r} (use argmax '
        'for greedy decoding)')


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def pallas_blocks(fn_name: str, m: int, v: int, dtype: Any,
                  block_m: int | None, block_v: int | None,
                  default_block_v: int) -> tuple[int, int, int, int]:
  """Block sizes and padded extents for a Pallas (rows, vocab) grid.

  Args:
    fn_name: Calling function's name, for error messages.
    m: Number of rows.
    v: Vocabulary size.
    dtype: Dtype of h; 16-bit rows pack two per sublane, so the default row
      block is rounded to 16 for them.
    block_m: Row block or None for the default; multiple of 8.
    block_v: Vocab block or None for the default; multiple of 128.
    default_block_v: Vocab block used when `block_v` is None.

  Returns:
    (block_m, block_v, m_padded, v_padded).
  """
  if block_m is None:
    row_multiple = SUBLANES * max(1, 4 // jnp.dtype(dtype).itemsize)
    block_m = min(DEFAULT_BLOCK_M, round_up(m, row_multiple))
  if block_v is None:
    block_v = min(default_block_v, round_up(v, LANES))
  if block_m <= 0 or block_m % SUBLANES:
    raise ValueError(
        f'{fn_name}: block_m must be a positive multiple of {SUBLANES} for '
        f'the Pallas kernel (TPU tiling), got {block_m}.')
  if block_v <= 0 or block_v % LANES:
    raise ValueError(
        f'{fn_name}: block_v must be a positive multiple of {LANES} for the '
        f'Pallas kernel (TPU tiling), got {block_v}.')
  return block_m, block_v, round_up(m, block_m), round_up(v, block_v)


def chunk_size(fn_name: str, v: int, block_v: int | None) -> int:
  """Vocab chunk of the chunked-XLA variants (any positive size)."""
  if block_v is None:
    block_v = DEFAULT_CHUNK_V
  if block_v <= 0:
    raise ValueError(f'{fn_name}: block_v must be positive, got {block_v}.')
  return min(block_v, v)


def pad_axis(x: jax.Array, axis: int, size: int, value: Any = 0) -> jax.Array:
  """Pads `x` along `axis` up to `size` (no-op, no copy, when already there)."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def projection_logits(h: jax.Array, w: jax.Array) -> jax.Array:
  """`h @ w` accumulated in float32, operands cast to their common dtype.

  Every implementation computes logits with this one function so that the
  per-element values (and hence ties and CDF steps) agree across them.
  """
  dtype = jnp.promote_types(h.dtype, w.dtype)
  return jnp.dot(h.astype(dtype), w.astype(dtype),
                 preferred_element_type=jnp.float32)


def block_argmax(x_MxV: jax.Array, col_MxV: jax.Array):
  """Row max and lowest column index attaining it (keepdims)."""
  max_Mx1 = jnp.max(x_MxV, axis=1, keepdims=True)
  idx_Mx1 = jnp.min(jnp.where(x_MxV == max_Mx1, col_MxV, INT32_MAX), axis=1,
                    keepdims=True)
  return max_Mx1, idx_Mx1


def safe_max(m: jax.Array) -> jax.Array:
  """Replaces -inf maxima by 0 so `exp(x - m)` gives 0, not NaN, for -inf x."""
  return jnp.where(m == -jnp.inf, 0.0, m)


def scan_vocab(body: Callable[[Any, Any, int], Any], init: Any, v: int,
               chunk: int) -> Any:
  """Folds `body(carry, start, size)` over vocab chunks [start, start+size).

  Full chunks run in a `fori_loop` (traced `start`); a final partial chunk, if
  any, runs once with a static smaller size. Nothing is padded, so W is never
  copied.

  Args:
    body: Chunk update; slices its operands with `lax.dynamic_slice_in_dim`.
    init: Initial carry.
    v: Vocabulary size.
    chunk: Chunk size, 1 <= chunk <= v.

  Returns:
    The final carry.
  """
  n_full, tail = divmod(v, chunk)
  carry = init
  if n_full == 1:
    carry = body(carry, 0, chunk)
  elif n_full > 1:
    carry = lax.fori_loop(0, n_full, lambda i, c: body(c, i * chunk, chunk),
                          carry)
  if tail:
    carry = body(carry, n_full * chunk, tail)
  return carry


def scalar_spec(interpret: bool) -> pl.BlockSpec:
  """BlockSpec for a (1, 1) f32 scalar operand (scalars live in SMEM on TPU)."""
  if interpret or backend() == 'tpu':
    return pl.BlockSpec(memory_space=pltpu.SMEM)
  return pl.BlockSpec((1, 1), lambda *_: (0, 0))


def compiler_params(interpret: bool):
  """Mosaic params: outer axis 'parallel', innermost axis 'arbitrary'.

  Every grid here reduces over its last axis, whose output blocks stay
  resident across it, so that axis must run sequentially.
  """
  if interpret or backend() != 'tpu':
    return None
  return pltpu.CompilerParams(dimension_semantics=('parallel', 'arbitrary'))
