"""A decode step's cached attention as one Pallas (Triton) GPU kernel.

A push-forward step sends 2k queries per row through attention over the KV
cache. XLA runs that as two batched dots, the masked softmax and a
transpose: several kernels per layer, each a few microseconds on a GPU,
where a small-batch decode step is bound by kernel count, and the two dots
read the cache's keys and values separately. Here one program per (row,
head) reads its queries, walks the cache in blocks of `block_s` slots with
an online softmax, and writes its output straight into the (B, L, H, K)
layout the output projection reads.

`cached_attention` is the kernel; `cached_attention_reference` the same
attention in plain XLA (what `model.Attention` computes), for tests.
On CPU the kernel runs in Pallas interpret mode (tests only: slow).
"""

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # Deprecated in jax 0.11 ('will be removed'): then 'auto' uses XLA.
  from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - depends on the jax version.
  plgpu = None

# Triton's dot wants every dimension >= 16; blocks must be powers of two.
MIN_QUERY_ROWS = 16
# The most queries per pass the kernel takes (all in one block: registers);
# model.Attention sends longer passes (a long prompt's prefill) to XLA.
MAX_QUERIES = 64
DEFAULT_BLOCK_S = 64
_NEG = float(jnp.finfo(jnp.float32).min)  # As model.Attention's mask.


def _next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def available() -> bool:
  """Whether this jax still has Pallas's Triton backend."""
  return plgpu is not None


def supports_head_dim(head_dim: int) -> bool:
  """Whether the kernel handles this head dim (a power of two >= 16)."""
  return head_dim >= 16 and head_dim == _next_pow2(head_dim)


def _check(q, k, v, mask, block_s):
  if q.ndim != 4:
    raise ValueError(f'cached_attention: queries have shape {q.shape}; '
                     'expected (B, L, H, K)')
  b, lq, h, hd = q.shape
  if k.ndim != 3 or k.shape[0] != b * h or k.shape[2] != hd:
    raise ValueError(f'cached_attention: keys have shape {k.shape}; expected '
                     f'(B*H, S, K) = ({b * h}, S, {hd}) (cache layout nsk)')
  if v.shape != k.shape:
    raise ValueError(f'cached_attention: values have shape {v.shape}, keys '
                     f'{k.shape}; expected the same')
  if mask.shape != (b, lq, k.shape[1]):
    raise ValueError(f'cached_attention: mask has shape {mask.shape}; '
                     f'expected (B, L, S) = {(b, lq, k.shape[1])}')
  if not supports_head_dim(hd):
    raise ValueError(f'cached_attention: head dim {hd} is not a power of two '
                     '>= 16 (Triton blocks)')
  if lq > MAX_QUERIES:
    raise ValueError(f'cached_attention: {lq} queries per pass; the kernel '
                     f'takes at most MAX_QUERIES={MAX_QUERIES}')
  if block_s < 16 or block_s != _next_pow2(block_s):
    raise ValueError(f'cached_attention: block_s={block_s} must be a power '
                     'of two >= 16')


def _kernel(q_ref, k_ref, v_ref, mask_ref, o_ref, *, num_queries, num_slots,
            block_s, scale):
  # The query block has a power-of-two number of rows, >= 16; the rows
  # past num_queries lie outside the arrays: never loaded nor stored.
  rows, head_dim = q_ref.shape
  real = (jnp.arange(rows) < num_queries)[:, None]
  q = plgpu.load(q_ref, mask=real, other=0.)

  def body(block, carry):
    m, l, acc = carry
    start = pl.multiple_of(block * block_s, block_s)
    slots = start + jnp.arange(block_s)
    valid = slots < num_slots  # The last block may run past the cache.
    window = pl.ds(start, block_s)
    k = plgpu.load(k_ref.at[window, :], mask=valid[:, None], other=0.)
    v = plgpu.load(v_ref.at[window, :], mask=valid[:, None], other=0.)
    seen = plgpu.load(mask_ref.at[:, window], mask=real & valid[None, :],
                      other=0)
    # float32 dots follow jax's default matmul precision, as XLA's path
    # does (TF32 on a GPU unless JAX_DEFAULT_MATMUL_PRECISION=highest).
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32) * scale
    s = jnp.where(seen != 0, s, _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    return m_new, l, acc * alpha[:, None] + pv

  init = (jnp.full((rows,), _NEG, jnp.float32),
          jnp.zeros((rows,), jnp.float32),
          jnp.zeros((rows, head_dim), jnp.float32))
  num_blocks = -(-num_slots // block_s)
  _, l, acc = lax.fori_loop(0, num_blocks, body, init)
  plgpu.store(o_ref, (acc / l[:, None]).astype(o_ref.dtype), mask=real)


def cached_attention(q_BxLxHxK, k_NxSxK, v_NxSxK, mask_BxLxS, *,
                     block_s: int = DEFAULT_BLOCK_S, interpret=None):
  """softmax(q k^T / sqrt(K), masked) v over the cache; (B, L, H, K).

  q_BxLxHxK: the step's queries (rotated). k_NxSxK, v_NxSxK: the cache in
  layout 'nsk' (n = b * H + h), new keys already written. mask_BxLxS:
  which slots each query sees (each sees at least one). `interpret`:
  None runs Pallas interpret mode off GPU.
  """
  if not available():
    raise RuntimeError('cached_attention needs Pallas\'s Triton backend '
                       '(jax.experimental.pallas.triton), which this jax '
                       f'{jax.__version__} lacks: use attention_impl=\'xla\'')
  _check(q_BxLxHxK, k_NxSxK, v_NxSxK, mask_BxLxS, block_s)
  b, lq, h, hd = q_BxLxHxK.shape
  num_slots = k_NxSxK.shape[1]
  if interpret is None:
    interpret = jax.default_backend() != 'gpu'
  # Blocks of `rows` query rows overhang the L real ones (masked in the
  # kernel): padding the arrays instead cost a pad and a slice per layer.
  rows = max(MIN_QUERY_ROWS, _next_pow2(lq))
  q = q_BxLxHxK.reshape(b, lq, h * hd)
  mask = mask_BxLxS.astype(jnp.int32)
  k = k_NxSxK.astype(q.dtype)
  v = v_NxSxK.astype(q.dtype)
  kernel = lambda *refs: _kernel(*refs, num_queries=lq, num_slots=num_slots,
                                 block_s=block_s, scale=1.0 / float(hd) ** 0.5)
  head_block = pl.BlockSpec((None, rows, hd), lambda i, j: (i, 0, j))
  cache_block = pl.BlockSpec((None, num_slots, hd),
                             lambda i, j: (i * h + j, 0, 0))
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((b, lq, h * hd), q.dtype),
      grid=(b, h),
      in_specs=[head_block, cache_block, cache_block,
                pl.BlockSpec((None, rows, num_slots), lambda i, j: (i, 0, 0))],
      out_specs=head_block,
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name='kforcing_cached_attention',
  )(q, k, v, mask)
  return out.reshape(b, lq, h, hd)


def cached_attention_reference(q_BxLxHxK, k_NxSxK, v_NxSxK, mask_BxLxS):
  """The same attention in plain XLA, as `model.Attention` computes it:
  float32 scores, probabilities cast to the queries' dtype."""
  b, lq, h, hd = q_BxLxHxK.shape
  k = k_NxSxK.reshape(b, h, -1, hd).astype(q_BxLxHxK.dtype)
  v = v_NxSxK.reshape(b, h, -1, hd).astype(q_BxLxHxK.dtype)
  scores = jnp.einsum('blhk,bhsk->bhls', q_BxLxHxK, k,
                      preferred_element_type=jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(hd))
  scores = jnp.where(mask_BxLxS[:, None], scores, _NEG)
  probs = jax.nn.softmax(scores, axis=-1).astype(q_BxLxHxK.dtype)
  return jnp.einsum('bhls,bhsk->blhk', probs, v)
