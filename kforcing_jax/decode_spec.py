"""What a decode is, before any compute: the static `DecodeSpec` (a jit
static argument), the loop's carry `DecodeState`, and the KV cache: its key
layout, its size, and its growth in segments. `kforcing_jax.decode`
re-exports the API among them (its `__all__`); import them from there."""

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import model as model_lib
from kforcing_jax import projection
from kforcing_jax.kernels import decode_attention


# DecodeSpec.key_layout values.
KEY_LAYOUTS = ('auto', 'k', 'kt')


# DecodeSpec.attention_impl values.
ATTENTION_IMPLS = ('auto',) + model_lib.ATTENTION_IMPLS


# DecodeSpec.readout values: how a student turns a slot's logits into its
# token.
READOUTS = ('argmax', 'sample', 'median')


def check_k(cfg: model_lib.ModelConfig, k, name: str = 'k') -> int:
  """k as an int in [1, window] (1 for an AR teacher); raises ValueError."""
  k = model_lib.as_int(k, name, 1)
  window = max(cfg.noise_window, 1)
  if k > window:
    kind = (f'a student trained with window {cfg.noise_window}'
            if cfg.noise_window else 'an AR teacher')
    raise ValueError(f'k={k} not allowed for {kind}: k must be in '
                     f'[1, {window}]')
  return k


def as_int32(value, name: str) -> int:
  """`value` as a Python int that fits int32 (a pad id: any such value)."""
  value = model_lib.as_int(value, name, -2**31)
  if value >= 2**31:
    raise ValueError(f'{name}={value} is not an int32')
  return value


# DecodeSpec.cache_block's default: the cache grows in blocks of this many
# slots (see `cache_segments`).
CACHE_BLOCK = 32


def cache_segments(prompt_len: int, k: int, num_steps: int,
                   cache_block: int) -> list[tuple[int, int]]:
  """(cache slots, first step that does not fit) of each loop segment.

  Attention reads every slot of the cache, valid or not, and reading the
  KV cache is most of a large-batch step. So the loop runs in segments
  whose cache is only as large as their steps need, padded between
  segments (one copy each); the prefill (step 0) uses the first segment's
  cache. The step with `step` steps done writes slots
  [P + (step - 1) k, P + (step + 1) k), so it fits a cache of S slots
  while step < (S - P) // k. cache_block 0: one segment, the full cache.
  """
  full, p = full_cache_size(prompt_len, num_steps, k), prompt_len
  sizes = []
  if cache_block > 0:
    size = -(-(p + 2 * k) // cache_block) * cache_block  # Prefill + step 1.
    while size < full:
      sizes.append(size)
      size += cache_block
  sizes.append(full)
  out = []
  for size in sizes:
    out.append((size, min(num_steps, (size - p) // k)))
    if out[-1][1] == num_steps:
      break
  return out


def full_cache_size(prompt_len: int, num_steps: int, k: int) -> int:
  """KV slots of a whole decode. Step s >= 1 (prefill is step 0) writes
  its 2k inputs at [P + (s - 1) k, P + (s + 1) k), so the last step,
  num_steps - 1, ends at P + num_steps * k."""
  return prompt_len + num_steps * k


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
  """Static (hashable) description of a decoding loop; a jit static arg."""
  model: model_lib.ModelConfig
  k: int  # Tokens per step: 1 for an AR teacher, <= noise_window for students.
  num_steps: int  # Steps including prefill; emits num_steps * k tokens.
  prompt_len: int  # Padded prompt length P.
  greedy: bool = False  # AR only: argmax instead of inverse-CDF sampling.
  # Track token counts for the frequency penalty. Without it the loop has
  # no counts, so a nonzero penalty argument is refused where it is a
  # concrete value (and ignored where it is traced).
  use_penalty: bool = False
  eos_id: int = -1  # Stop a row after this token (-1: never).
  pad_id: int = 0  # Written after a row stops.
  kernel_impl: str = 'auto'  # Vocabulary projection: see projection.py.
  # The cache grows in blocks of this many slots (0: full size from the
  # start), so early steps attend over fewer slots; see `segments`.
  cache_block: int = CACHE_BLOCK
  # Key-cache layout (model.CACHE_LAYOUTS): 'auto' is `key_layout(spec)`;
  # 'k' or 'kt' forces one (the tokens are the same), e.g. to time both.
  key_layout: str = 'auto'
  # Cached attention (model.ATTENTION_IMPLS): 'auto' is
  # `attention_impl(spec)`; 'xla' or 'pallas' forces one (the same
  # attention to rounding; 'pallas' runs interpret mode off GPU).
  attention_impl: str = 'auto'
  # Students only. 'argmax' (the paper's): the slot's most likely token.
  # 'sample' (ours): inverse CDF of the slot's softmax at the loop's
  # temperature, drawn with `noise.fine_uniform` of the slot's u, the bits
  # its noise encoder cannot resolve; still a function of the noise.
  # 'median' (ours): the token at the median of that softmax in vocabulary
  # order (its inverse CDF at 0.5; `noise.readout_uniform`): where the
  # student cannot resolve which CDF interval holds u, its softmax spreads
  # over the intervals around u, and their median is near u's own token,
  # where the argmax picks the likeliest one.
  readout: str = 'argmax'

  def __post_init__(self):
    # Checked here, not only in `generate`, because a bad spec handed to
    # `decode_loop` would otherwise decode wrong tokens without an error.
    if not isinstance(self.model, model_lib.ModelConfig):
      raise TypeError(f'DecodeSpec.model must be a ModelConfig, got '
                      f'{type(self.model).__name__}')
    object.__setattr__(self, 'k', check_k(self.model, self.k, 'DecodeSpec.k'))
    ints = (('num_steps', 1), ('prompt_len', 1), ('cache_block', 0),
            ('eos_id', -1))
    for name, minimum in ints:
      object.__setattr__(self, name, model_lib.as_int(
          getattr(self, name), f'DecodeSpec.{name}', minimum))
    object.__setattr__(self, 'pad_id',
                       as_int32(self.pad_id, 'DecodeSpec.pad_id'))
    for name in ('greedy', 'use_penalty'):
      value = getattr(self, name)
      if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f'DecodeSpec.{name} must be a Python bool, got '
                         f'{value!r}')
      object.__setattr__(self, name, bool(value))
    if self.eos_id >= self.model.vocab_size:
      raise ValueError(f'eos_id={self.eos_id} outside the vocabulary '
                       f'[0, {self.model.vocab_size}) (-1: never stop)')
    if self.key_layout not in KEY_LAYOUTS:
      raise ValueError(f'DecodeSpec.key_layout={self.key_layout!r}: expected '
                       f'one of {KEY_LAYOUTS}')
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f'DecodeSpec.attention_impl={self.attention_impl!r}: '
                       f'expected one of {ATTENTION_IMPLS}')
    if self.attention_impl == 'pallas' and (misfit := _pallas_misfit(self)):
      raise ValueError(f"DecodeSpec: attention_impl='pallas' {misfit}")
    if self.readout not in READOUTS:
      raise ValueError(f'DecodeSpec.readout={self.readout!r}: expected one '
                       f'of {READOUTS}')
    if self.readout != 'argmax' and not self.is_student:
      raise ValueError(f'DecodeSpec.readout={self.readout!r} is for '
                       'students; an AR teacher samples by inverse CDF of '
                       'its u already (greedy=True for argmax)')
    if self.readout != 'argmax' and self.greedy:
      raise ValueError(f'DecodeSpec.readout={self.readout!r} with '
                       'greedy=True: a greedy decode takes the argmax')
    projection.check_impl(self.kernel_impl)
    # Rotary angles beyond the model's table would be clipped, not
    # extrapolated: refuse a loop whose positions could reach them.
    hi = model_lib.rope_span(self.model)[1]
    if self.cache_size > hi:
      raise ValueError(
          f'DecodeSpec: prompt_len + num_steps * k = {self.cache_size} '
          f'positions exceed what the model supports ({hi} for seq_len='
          f'{self.model.seq_len}); generate() keeps prompt + new tokens '
          '<= seq_len')

  @property
  def is_student(self) -> bool:
    return self.model.noise_window > 0

  @property
  def cache_size(self) -> int:
    return full_cache_size(self.prompt_len, self.num_steps, self.k)

  def segments(self) -> list[tuple[int, int]]:
    """(cache slots, first step that does not fit) of each loop segment:
    `cache_segments` of this spec."""
    return cache_segments(self.prompt_len, self.k, self.num_steps,
                          self.cache_block)

  @property
  def max_new_tokens(self) -> int:
    return self.num_steps * self.k


@flax.struct.dataclass
class DecodeState:
  """Loop carry of the decoding while_loop."""
  cache: Any  # Per-layer {'k' or 'kt', 'v'}: see init_cache.
  index: jax.Array  # Slots [0, index) hold valid K/V (incl. left padding).
  pad: jax.Array  # (B,) left-padding of each prompt.
  pending: jax.Array  # (B, k) tokens emitted last step, not yet cached.
  tokens: jax.Array  # (B, max_new) emitted tokens; pad_id after a stop.
  step: jax.Array  # Steps done (prefill counts as one).
  done: jax.Array  # (B,) row has emitted eos.
  lengths: jax.Array  # (B,) tokens emitted up to and including eos.
  counts: Any  # (B, V) int32 token counts (frequency penalty) or None.


def key_layout(spec: DecodeSpec) -> str:
  """The key-cache layout `spec` decodes with ('k' or 'kt').

  'auto': on CPU 'kt' for push-forward steps (measured: their scores dot
  about 2x faster) and 'k' for AR; elsewhere 'k' (measured on one H100 for
  LM1B size, k=4 at batch 8 only: 0.75 vs 0.79 ms per step, 'kt' added 35
  slicing kernels per step; not measured on a TPU). Both layouts give the
  same numbers. Where the spec attends with the Pallas kernel
  (`attention_impl`), 'auto' is 'k', on CPU too: the kernel reads that.
  """
  if spec.key_layout != 'auto':
    return spec.key_layout
  if attention_impl(spec) == 'pallas':
    return 'k'
  return 'kt' if spec.k > 1 and jax.default_backend() == 'cpu' else 'k'


def attention_impl(spec: DecodeSpec) -> str:
  """How `spec`'s cached steps attend ('xla' or 'pallas').

  'auto': on a GPU 'pallas' for push-forward steps (one kernel per layer in
  place of XLA's dots, softmax and transpose) where the head dim and key
  layout allow it; 'xla' for AR steps (a single query: XLA already fuses
  its attention into one kernel) and on every other backend. Measured on
  one H100 for LM1B size with the kernel's first version (776d3dd, which
  padded the queries): k=4 kernel time per step -6% at batch 8, -1% at
  batch 1; AR steps +4% at batch 8. The current version is not timed yet
  (README). A pass with more than MAX_QUERIES queries (a long prompt's
  prefill) attends with XLA either way (model.Attention).
  """
  if spec.attention_impl != 'auto':
    return spec.attention_impl
  if (spec.k > 1 and jax.default_backend() == 'gpu'
      and not _pallas_misfit(spec)):
    return 'pallas'
  return 'xla'


def _pallas_misfit(spec: DecodeSpec) -> str | None:
  """Why `spec` cannot attend with the Pallas kernel, or None: what a
  forced 'pallas' is refused for, and what keeps 'auto' on XLA."""
  return pallas_misfit(spec.model.d_model, spec.model.num_heads,
                       spec.key_layout)


def pallas_misfit(d_model: int, num_heads: int,
                  key_layout: str = 'auto') -> str | None:
  """Why a model of this width and head count, with this key layout,
  cannot attend with the Pallas kernel, or None. Also for callers that
  hold no DecodeSpec yet (the bench refuses a forced 'pallas' with it
  before measuring anything)."""
  if not decode_attention.available():
    return (f"needs Pallas's Triton backend, which jax {jax.__version__} "
            "lacks; use 'xla'")
  if key_layout == 'kt':
    return "reads keys in layout 'k'; key_layout='kt' cannot go with it"
  head_dim = d_model // num_heads
  if not decode_attention.supports_head_dim(head_dim):
    return ('needs a head dim that is a power of two >= 16; this model has '
            f'{head_dim} (d_model={d_model} / num_heads={num_heads})')
  return None


def init_cache(spec: DecodeSpec, batch_size: int, size: int | None = None):
  """Zeroed per-layer KV cache for `spec` with `size` slots (default: all
  of spec.cache_size; a smaller one is grown with `grow_cache`). Keys in
  `key_layout(spec)`; see `model.CACHE_LAYOUTS`.
  """
  cfg = spec.model
  batch_size = model_lib.as_int(batch_size, 'batch_size', 1)
  size = (spec.cache_size if size is None else
          model_lib.as_int(size, 'cache size', 1))
  dims = {'n': batch_size * cfg.num_heads, 's': size, 'k': cfg.head_dim}

  def zeros(name):
    shape = [dims[axis] for axis in model_lib.CACHE_LAYOUTS[name]]
    return jnp.zeros(shape, cfg.compute_dtype)

  key_name = key_layout(spec)
  return tuple({key_name: zeros(key_name), 'v': zeros('v')}
               for _ in range(cfg.num_layers))


def cache_slots(cache) -> int:
  return cache[0]['v'].shape[model_lib.CACHE_LAYOUTS['v'].index('s')]


def grow_cache(cache, size: int):
  """Pads every layer's cache with empty slots up to `size` slots."""
  def pad(name, x):
    axis = model_lib.CACHE_LAYOUTS[name].index('s')
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)
  return tuple({name: pad(name, x) for name, x in layer.items()}
               for layer in cache)
