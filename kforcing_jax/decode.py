"""Decoding that advances k positions per forward pass (k = 1: AR teacher).

Layout of one step, for a batch of left-padded prompts:
  prefill:  [prompt | k noise slots]  -> the first k tokens (AR: logits of
            the last prompt position give the first token)
  step:     [k tokens emitted last step | k fresh noise slots] -> k tokens
The cache holds K/V of prompt and emitted tokens only; the noise slots' K/V
land in slack slots past the valid index and are overwritten by the next
step's tokens (see `Transformer.cached_step`).

Noise: one uniform u per generated token, an array (B, max_new_tokens). The
AR teacher samples token n by inverse CDF of u[:, n]; a student emits token n
from the noise slot fed u[:, n]. The same noise therefore couples teacher and
student: a perfect student reproduces the teacher's tokens exactly.

Public step-level API (for callers that drive their own loop):
  `pad_prompts`, `init_cache`, `prefill`, `decode_step` (and `forward`, the
  raw cached pass returning logits); `decode_loop` is the whole loop as one
  jitted program and `generate` its validating front end. A bfloat16 model's
  own loop should pass `model.compute_params(cfg, params)`, made once, to
  every step, as `decode_loop` does: same tokens, no per-step weight casts.
"""

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import layouts
from kforcing_jax import model as model_lib
from kforcing_jax import noise as noise_lib
from kforcing_jax import projection
from kforcing_jax.kernels import _common
from kforcing_jax.kernels import decode_attention


# DecodeSpec.key_layout values.
KEY_LAYOUTS = ('auto', 'k', 'kt')
# DecodeSpec.attention_impl values.
ATTENTION_IMPLS = ('auto',) + model_lib.ATTENTION_IMPLS


# The smallest AR temperature generate() accepts: logits / temperature
# stays finite in float32 (max 3.4e38) for |logits| up to 1e8. Below it
# use greedy=True, which is the limit anyway.
MIN_TEMPERATURE = 1e-30


def check_sampling_temperature(temperature, argmax_hint: str) -> None:
  """Refuses a sampling temperature that is not a finite float32 number
  >= MIN_TEMPERATURE (elementwise for an array): logits / temperature
  would be NaN, or the distribution flipped. `argmax_hint` says how to ask
  for greedy decoding instead."""
  t = _common.as_number_array(temperature)
  if t is None or not np.all(
      (t >= MIN_TEMPERATURE) & (t <= np.finfo(np.float32).max)):
    raise ValueError(f'temperature={temperature!r} must be finite in '
                     f'float32 and >= {MIN_TEMPERATURE:g} ({argmax_hint} '
                     'for argmax)')


def max_frequency_penalty(seq_len: int) -> float:
  """The largest frequency penalty whose lambda * count stays finite in
  float32, with room for the logits: a token's count reaches at most
  seq_len. Past it every seen token's logit became -inf, and once every
  token had been seen the argmax fell back to token 0 at each step."""
  return float(np.finfo(np.float32).max) / (2 * seq_len)


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


def _as_int32(value, name: str) -> int:
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
                       _as_int32(self.pad_id, 'DecodeSpec.pad_id'))
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


def _select(spec, params, h_BxKxD, u_BxK, counts, temperature, penalty):
  """Turns the k emitting hidden states into k tokens.

  Student: argmax (its output is a deterministic function of the noise).
  Teacher: inverse CDF of u, or argmax when greedy. The frequency penalty
  subtracts penalty * count from the logits; counts include earlier slots of
  the same step, so penalised slots are chosen one after another, but the
  logits of all k slots come from one projection (one read of the
  unembedding, not k). The projection goes through `projection`
  (kernels.impl).
  """
  w_DxV = params['unembed']['kernel']
  b, k, d = h_BxKxD.shape
  if not (spec.is_student or spec.greedy):  # AR sampling: k == 1.
    tok = projection.inverse_cdf(h_BxKxD[:, 0], w_DxV, u_BxK[:, 0],
                                 spec.kernel_impl, temperature, counts,
                                 penalty)
    return tok[:, None], _count(counts, tok)
  if counts is None:
    tok = projection.argmax(h_BxKxD.reshape(b * k, d), w_DxV,
                            spec.kernel_impl)
    return tok.reshape(b, k), None
  reference = projection.resolved(spec.kernel_impl) == 'reference'
  if reference:
    logits_BxKxV = projection.logits(h_BxKxD, w_DxV)
  tokens = []
  for i in range(k):
    if reference:
      tok = projection.penalised_argmax(logits_BxKxV[:, i], counts, penalty)
    else:  # Kernels apply the penalty inside their vocabulary loop.
      tok = projection.argmax(h_BxKxD[:, i], w_DxV, spec.kernel_impl, counts,
                              penalty)
    counts = _count(counts, tok)
    tokens.append(tok)
  return jnp.stack(tokens, axis=1), counts


def _count(counts, tok_B):
  if counts is None:
    return None
  return counts.at[jnp.arange(tok_B.shape[0]), tok_B].add(1)


def _record(spec, state, new_BxK):
  """Writes emitted tokens into the output, applying per-row eos stops."""
  is_eos = new_BxK == spec.eos_id
  # A token is kept if no eos came before it in this row.
  eos_before = jnp.cumsum(is_eos, axis=1) - is_eos
  keep = ~state.done[:, None] & (eos_before == 0)
  out = jnp.where(keep, new_BxK, spec.pad_id)
  # int32 indices, also under jax_enable_x64 (where a literal 0 is int64).
  tokens = jax.lax.dynamic_update_slice(
      state.tokens, out, (jnp.int32(0), (state.step * spec.k).astype(
          jnp.int32)))
  return state.replace(
      tokens=tokens, pending=new_BxK, step=state.step + 1,
      lengths=state.lengths + keep.sum(axis=1).astype(jnp.int32),
      done=state.done | jnp.any(is_eos & keep, axis=1))


def _hidden(spec, params, tokens_BxT, u_BxK, cache, index, pad,
            noise_x_BxKxD=None):
  """Cached pass over [tokens | noise slots]; hidden states of the k
  emitting positions (student: the noise slots; AR: the last token).
  `noise_x_BxKxD`: the slots' `embed_noise(u_BxK)`, if already computed."""
  model = model_lib.Transformer(spec.model, attention_impl(spec))
  num_new = tokens_BxT.shape[1] + (u_BxK.shape[1] if spec.is_student else 0)
  positions, mask = layouts.decode_layout(pad, index, num_new,
                                          cache_slots(cache))
  h, cache = model.apply(
      {'params': params}, tokens_BxT,
      u_BxK if spec.is_student else None, positions, mask, cache,
      index, spec.k, noise_x_BxKxD if spec.is_student else None,
      method=model_lib.Transformer.cached_step)
  return h, cache


def embed_noise(spec, params, noise_BxN):
  """The student's noise-slot inputs for all of `noise_BxN` at once:
  (B, N, D). One pass over every step's noise is far cheaper than k rows
  per step (a step is latency-bound); `decode_loop` does this. The array
  is the size of one layer's keys: a small part of the KV cache."""
  model_lib.check_params(spec.model, params)  # Shapes only: trace time.
  return model_lib.Transformer(spec.model).apply(
      {'params': params}, noise_BxN,
      method=model_lib.Transformer.embed_noise)


def forward(spec, params, tokens_BxT, u_BxK, cache, index, pad):
  """Cached forward of [tokens | noise slots] written at slot `index`.

  Returns (logits of the k emitting positions (B, k, V), new cache).
  Shapes, the cache and the parameters are checked against `spec` at trace
  time; token values are not (`generate` checks those). Slots before
  `pad` are padding: their ids are never read.
  """
  b = tokens_BxT.shape[0]
  _check_shape('pad', pad, (b,))
  if spec.is_student:
    _check_shape('noise', u_BxK, (b, spec.k))
  _check_cache(spec, cache, b)
  model_lib.check_params(spec.model, params)  # Shapes only: trace time.
  _, tokens_BxT = _unpad(tokens_BxT, index, pad)
  h, cache = _hidden(spec, params, tokens_BxT, u_BxK, cache, index, pad)
  return projection.logits(h, params['unembed']['kernel']), cache


def check_penalty_tracked(spec: DecodeSpec, penalty) -> None:
  """Refuses a nonzero penalty for a spec without token counts, which
  would ignore it. Traced values (inside the caller's jit) cannot be read
  and pass unchecked."""
  if spec.use_penalty or isinstance(penalty, (jax.core.Tracer,
                                              jax.ShapeDtypeStruct)):
    return  # A shape-only stand-in (to `.lower`) has no value either.
  if np.any(np.asarray(penalty) != 0):
    raise ValueError(f'penalty={penalty!r} but DecodeSpec.use_penalty=False,'
                     ' which would ignore it; build the spec with '
                     'use_penalty=True')


def _check_shape(name: str, x, expected: tuple[int, ...]):
  """Static shape check (free under jit): a wrong width would otherwise be
  clamped by dynamic slicing into silently wrong tokens."""
  if tuple(x.shape) != expected:
    raise ValueError(f'{name} has shape {tuple(x.shape)}; expected '
                     f'{expected}')


def _unpad(tokens_BxT, index, pad_B):
  """(valid (B, T), tokens with 0 in padded slots) for tokens written at
  slot `index`. Padding is masked, but an id outside the vocabulary would
  embed as NaN (jnp.take fills), which leaks through the mask: never read
  it."""
  slots = index + jnp.arange(tokens_BxT.shape[1])[None]
  valid = slots >= pad_B[:, None]
  return valid, jnp.where(valid, tokens_BxT, 0)


def _check_cache(spec: DecodeSpec, cache, b: int):
  """The cache must be one `init_cache(spec, b, ...)` made: another spec's
  (key layout, layer count, batch) would decode wrong tokens silently."""
  key_name = key_layout(spec)
  cfg = spec.model
  if not isinstance(cache, (tuple, list)) or len(cache) != cfg.num_layers:
    raise ValueError(f'cache must hold {cfg.num_layers} layers (init_cache('
                     f'spec, ...)); got {type(cache).__name__} of '
                     f'{len(cache) if hasattr(cache, "__len__") else "?"}')
  want = {'n': b * cfg.num_heads, 'k': cfg.head_dim}
  for layer in cache:
    if not isinstance(layer, Mapping) or set(layer) != {key_name, 'v'}:
      names = sorted(layer) if isinstance(layer, Mapping) else layer
      raise ValueError(f'cache layers have {names!r}; this spec decodes '
                       f"with keys {key_name!r} and 'v' (init_cache(spec, "
                       '...) for this spec)')
    for name, x in layer.items():
      axes = model_lib.CACHE_LAYOUTS[name]
      got = (None if x.ndim != len(axes) else
             {axis: x.shape[i] for i, axis in enumerate(axes) if axis != 's'})
      if got != want:
        raise ValueError(f'cache {name!r} has shape {tuple(x.shape)} '
                         f'(axes {axes}); batch {b} x {cfg.num_heads} heads '
                         f'and head_dim {cfg.head_dim} expected')


def _check_state(spec: DecodeSpec, state: DecodeState):
  """A state from another spec (another k, another length) would write its
  tokens at the wrong offsets without an error: refuse it at trace time.
  Checks what the arrays show (shapes, key layout, penalty counts), not
  the spec fields they do not (prompt_len, eos_id, pad_id, greedy)."""
  b = state.pending.shape[0]
  _check_shape('state.pending', state.pending, (b, spec.k))
  _check_shape('state.tokens', state.tokens, (b, spec.max_new_tokens))
  _check_shape('state.pad', state.pad, (b,))
  _check_cache(spec, state.cache, b)
  if spec.use_penalty != (state.counts is not None):
    raise ValueError(f'DecodeSpec.use_penalty={spec.use_penalty} but the '
                     'state was made by a spec with use_penalty='
                     f'{state.counts is not None}')


def _check_noise_x(spec: DecodeSpec, noise_x, b: int):
  if noise_x is None:
    return
  if not spec.is_student:
    raise ValueError('noise_x is for a student; this spec is an AR '
                     "teacher's")
  _check_shape('noise_x', noise_x, (b, spec.k, spec.model.d_model))


def prefill(spec: DecodeSpec, params, prompts_BxP, pad_B, noise_BxK,
            temperature=1.0, penalty=0.0, cache_size: int | None = None,
            *, noise_x=None) -> DecodeState:
  """Runs the prompts (and, for a student, the first k noise slots).

  Returns the loop state after the first k tokens have been emitted. Its
  cache has `cache_size` slots (default spec.cache_size, enough for every
  step; under jit it must be static); `decode_step` works with any cache
  that has room for its step (see `DecodeSpec.segments`). `noise_x`
  (student only): `embed_noise(spec, params, noise_BxK)` if the caller
  embedded its noise ahead (as `decode_loop` does); computed here if None.
  """
  _check_inputs(prompts_BxP, pad_B, noise_BxK)
  b = prompts_BxP.shape[0]
  _check_shape('prompts', prompts_BxP, (b, spec.prompt_len))
  _check_shape('pad', pad_B, (b,))
  _check_shape('noise', noise_BxK, (b, spec.k))
  check_values(spec, prompts_BxP, pad_B, noise_BxK, temperature)
  _check_noise_x(spec, noise_x, b)
  if cache_size is not None:
    written = spec.prompt_len + (spec.k if spec.is_student else 0)
    if model_lib.as_int(cache_size, 'cache_size', 1) < written:
      raise ValueError(
          f'cache_size={cache_size} is smaller than the {written} slots the '
          f'prefill writes (prompt_len={spec.prompt_len}'
          f'{f" + k={spec.k} noise slots" if spec.is_student else ""})')
  model_lib.check_params(spec.model, params)  # Shapes only: trace time.
  check_penalty_tracked(spec, penalty)
  valid, prompts_BxP = _unpad(prompts_BxP, 0, pad_B)
  counts = None
  if spec.use_penalty:
    counts = jnp.zeros((b, spec.model.vocab_size), jnp.int32)
    counts = counts.at[jnp.arange(b)[:, None], prompts_BxP].add(
        valid.astype(jnp.int32))
  h, cache = _hidden(spec, params, prompts_BxP, noise_BxK,
                     init_cache(spec, b, cache_size), 0, pad_B, noise_x)
  new, counts = _select(spec, params, h, noise_BxK, counts, temperature,
                        penalty)
  state = DecodeState(
      cache=cache, index=jnp.int32(spec.prompt_len), pad=pad_B,
      pending=new, tokens=jnp.full((b, spec.max_new_tokens), spec.pad_id,
                                   jnp.int32),
      step=jnp.int32(0), done=jnp.zeros((b,), bool),
      lengths=jnp.zeros((b,), jnp.int32), counts=counts)
  return _record(spec, state, new)


def _check_room(spec: DecodeSpec, state: DecodeState) -> None:
  """decode_step's bounds, where state.step and state.index can be read."""
  if not (_common.readable(state.step) and _common.readable(state.index)):
    return
  step, index = int(state.step), int(state.index)
  if step >= spec.num_steps:
    raise ValueError(f'state.step={step}: the spec has num_steps='
                     f'{spec.num_steps} (prefill included), all done; '
                     'another step would overwrite the last tokens')
  need = index + spec.k * (2 if spec.is_student else 1)
  if cache_slots(state.cache) < need:
    raise ValueError(f'the cache has {cache_slots(state.cache)} slots; this '
                     f'step needs {need} (grow_cache(state.cache, {need}) or '
                     'more)')


def decode_step(spec: DecodeSpec, params, state: DecodeState, noise_BxK,
                temperature=1.0, penalty=0.0, *, noise_x=None
                ) -> DecodeState:
  """Feeds the pending k tokens (+ k noise slots) and emits k more tokens.

  Call it at most spec.num_steps - 1 times after `prefill`, on a cache with
  at least state.index + 2k slots (a student's; state.index + k for the
  AR teacher; `grow_cache` pads one). Past them XLA clamps the writes, so
  earlier tokens are overwritten without an error: both bounds, and the
  noise and temperature values, are checked where they can be read
  (called outside jit, where reading them waits for the device each
  step); under jit they are the caller's to keep, as `decode_loop` does.
  `noise_x`: as in `prefill`. The state must come from `prefill` with this
  spec; its shapes, key layout and penalty counts are checked against the
  spec at trace time.
  """
  _check_state(spec, state)
  _check_array('noise', noise_BxK, jnp.floating, 'floats in [0, 1)')
  _check_shape('noise', noise_BxK, state.pending.shape)
  _check_noise_x(spec, noise_x, state.pending.shape[0])
  check_values(spec, noise=noise_BxK, temperature=temperature)
  _check_room(spec, state)
  model_lib.check_params(spec.model, params)  # Shapes only: trace time.
  check_penalty_tracked(spec, penalty)
  h, cache = _hidden(spec, params, state.pending, noise_BxK, state.cache,
                     state.index, state.pad, noise_x)
  new, counts = _select(spec, params, h, noise_BxK, state.counts,
                        temperature, penalty)
  state = state.replace(cache=cache, index=state.index + spec.k,
                        counts=counts)
  return _record(spec, state, new)


def _check_array(name: str, x, kind, what: str):
  """Trace-time dtype check naming the argument: a list, float ids or a
  float pad otherwise failed deep in flax or jax, and bool ids decoded as
  tokens 0 and 1."""
  dtype = getattr(x, 'dtype', None)
  if dtype is None or not hasattr(x, 'shape'):
    raise ValueError(f'{name} must be an array (numpy or jax) of {what}; '
                     f'got {type(x).__name__}')
  if not jnp.issubdtype(dtype, kind):
    raise ValueError(f'{name} must hold {what}; got dtype {dtype}')


def check_values(spec: DecodeSpec, prompts_BxP=None, pad_B=None,
                 noise=None, temperature=None) -> None:
  """Refuses, where their values can be read, what would decode wrong
  tokens without an error: a pad outside [0, prompt_len) (`check_pad`), a
  prompt id outside the vocabulary (NaN embedding, or a wrapped index),
  noise outside [0, 1) (clamped to the first or last token), a
  temperature `check_sampling_temperature` refuses unless the spec is
  greedy. Traced values (under the caller's jit) pass; `generate` checks
  its inputs on the host."""
  readable = _common.readable
  if pad_B is not None:
    check_pad(spec, pad_B)
  ids = (np.asarray(prompts_BxP) if prompts_BxP is not None and
         readable(prompts_BxP) and readable(pad_B) else None)
  pad = None if ids is None else np.asarray(pad_B)
  # Other shapes and dtypes are refused by name at trace time.
  if (ids is not None and ids.ndim == 2 and ids.dtype.kind in 'iu' and
      pad.shape == ids.shape[:1]):
    valid = np.arange(ids.shape[1])[None] >= pad[:, None]
    bad = valid & ((ids < 0) | (ids >= spec.model.vocab_size))
    if bad.any():
      row, col = np.argwhere(bad)[0]
      raise ValueError(f'prompts[{row}, {col}]: token id {int(ids[row, col])}'
                       f' outside the vocabulary [0, '
                       f'{spec.model.vocab_size})')
  if noise is not None and readable(noise):
    noise_lib.check_noise(noise)
  if temperature is not None and not spec.greedy and readable(temperature):
    check_sampling_temperature(temperature, 'greedy=True in the DecodeSpec')


def check_pad(spec: DecodeSpec, pad_B) -> None:
  """Refuses a row padding outside [0, prompt_len) where its values can be
  read (not under a transform): such a row decodes from a shifted or empty
  prompt without an error."""
  if not _common.readable(pad_B):
    return
  pad = np.asarray(pad_B)
  if pad.size and (pad.min() < 0 or pad.max() >= spec.prompt_len):
    bad = int(pad.min() if pad.min() < 0 else pad.max())
    raise ValueError(f'pad {bad} outside [0, prompt_len={spec.prompt_len}):'
                     " pad_B is each row's count of left padding slots "
                     '(pad_prompts makes it)')


def _check_inputs(prompts_BxP, pad_B, noise):
  _check_array('prompts', prompts_BxP, jnp.integer, 'integer token ids')
  _check_array('pad', pad_B, jnp.integer, 'integer padding lengths')
  _check_array('noise', noise, jnp.floating, 'floats in [0, 1)')


def _loop(spec, params, prompts_BxP, pad_B, noise_BxN, temperature, penalty):
  _check_inputs(prompts_BxP, pad_B, noise_BxN)
  k = spec.k
  _check_shape('noise', noise_BxN,
               (prompts_BxP.shape[0], spec.num_steps * k))
  segments = spec.segments()
  # Block weights in the compute dtype once, not cast again every step.
  params = model_lib.compute_params(spec.model, params)
  # The noise encoder reads only u: embed every step's noise in one pass.
  noise_x = (embed_noise(spec, params, noise_BxN) if spec.is_student
             else None)
  state = prefill(spec, params, prompts_BxP, pad_B, noise_BxN[:, :k],
                  temperature, penalty, cache_size=segments[0][0],
                  noise_x=None if noise_x is None else noise_x[:, :k])

  def body(state):
    u = jax.lax.dynamic_slice_in_dim(noise_BxN, state.step * k, k, axis=1)
    x = (None if noise_x is None else jax.lax.dynamic_slice_in_dim(
        noise_x, state.step * k, k, axis=1))
    return decode_step(spec, params, state, u, temperature, penalty,
                       noise_x=x)

  done = 1  # Prefill is step 0; steps [done, end) remain in a segment.
  for size, end in segments:
    if end <= done:
      # No step left (num_steps == 1): tracing a step anyway would write
      # 2k slots into a cache sized for the prefill alone.
      continue
    done = end
    if size > cache_slots(state.cache):
      state = state.replace(cache=grow_cache(state.cache, size))

    def cond(state, end=end):
      # Stop reasons: the segment's steps are done, or every row has
      # emitted eos.
      return (state.step < end) & ~jnp.all(state.done)

    state = jax.lax.while_loop(cond, body, state)
  return state.tokens, state.lengths


_decode_loop_jit = jax.jit(_loop, static_argnums=0)


class _DecodeLoop:
  """decode_loop(spec, params, prompts_BxP, pad_B, noise_BxN, temperature,
  penalty) -> (tokens (B, num_steps * k), lengths (B,)).

  The whole decode (prefill + while_loop) as one jitted program (spec is
  static). noise_BxN must have num_steps * k columns, in [0, 1);
  temperature finite and >= 1e-30 unless the spec is greedy. Benchmarks
  lower and compile it once per spec; `generate` is the front end that
  also pads prompts and draws noise (shapes and the spec are checked here
  too, at trace time). Calling it or `.lower` first refuses, where the
  values can be read, a nonzero penalty for a spec without use_penalty,
  a pad outside [0, prompt_len) and what `check_values` refuses (prompt
  ids, noise, temperature); other attributes (`.trace`, `.eval_shape`,
  ...) are the jitted function's.
  """

  def __getattr__(self, name):
    return getattr(_decode_loop_jit, name)

  def __call__(self, spec, params, prompts_BxP, pad_B, noise_BxN,
               temperature=1.0, penalty=0.0):
    check_penalty_tracked(spec, penalty)
    check_values(spec, prompts_BxP, pad_B, noise_BxN, temperature)
    return _decode_loop_jit(spec, params, prompts_BxP, pad_B, noise_BxN,
                            temperature, penalty)

  def lower(self, spec, params, prompts_BxP, pad_B, noise_BxN,
            temperature=1.0, penalty=0.0):
    check_penalty_tracked(spec, penalty)
    check_values(spec, prompts_BxP, pad_B, noise_BxN, temperature)
    return _decode_loop_jit.lower(spec, params, prompts_BxP, pad_B,
                                  noise_BxN, temperature, penalty)


decode_loop = _DecodeLoop()


@dataclasses.dataclass
class GenerateOutput:
  tokens: np.ndarray  # (B, max_new_tokens) int32, pad_id after eos.
  lengths: np.ndarray  # (B,) number of valid tokens (eos included).


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0,
                width: int | None = None):
  """Left-pads a list of token lists -> (prompts_BxP, pad_B) numpy arrays.

  `pad_id` may be any int32: padded positions are masked and their ids
  never read (`prefill` replaces them). `width`: P, at least the longest
  prompt (default: the longest); one width for prompts of varying lengths
  keeps a jitted decode from compiling again for each new longest prompt.
  """
  if isinstance(prompts, (str, bytes)):
    raise ValueError(f'prompts must be token-id lists, not text: got '
                     f'{prompts[:40]!r} (tokenize it first)')
  if not isinstance(prompts, Iterable):
    raise ValueError('prompts must be a list of token-id lists; got '
                     f'{prompts!r}')
  if (isinstance(prompts, tuple) and len(prompts) == 2 and
      all(isinstance(x, np.ndarray) for x in prompts) and
      prompts[0].ndim == 2 and prompts[1].ndim == 1):
    raise ValueError('prompts is a (prompts_BxP, pad_B) pair, as '
                     'pad_prompts returns; pass the token-id lists themselves'
                     ' (they are padded here), or the pair to decode_loop')
  pad_id = _as_int32(pad_id, 'pad_id')
  rows = []
  for i, p in enumerate(prompts):
    row = np.asarray(p)
    if row.ndim != 1 or (row.size and row.dtype.kind not in 'iu'):
      raise ValueError(f'prompt {i} must be a list of int token ids; got '
                       f'{p!r}')
    _check_int32(row, f'prompt {i}')
    rows.append(row)
  lens = [len(r) for r in rows]
  if not rows or min(lens) == 0:
    raise ValueError('every prompt needs at least one token; got lengths '
                     f'{lens}')
  if width is None:
    width = max(lens)
  width = model_lib.as_int(width, 'width', 1)
  if width < max(lens):
    raise ValueError(f'width={width} is shorter than the longest prompt '
                     f'({max(lens)} tokens)')
  out = np.full((len(rows), width), pad_id, np.int32)
  for i, row in enumerate(rows):
    out[i, width - len(row):] = row
  return out, np.asarray([width - n for n in lens], np.int32)


def _check_int32(ids, what: str):
  """Before a cast to int32, which would wrap 2**32 + 5 into 5."""
  info = np.iinfo(np.int32)
  if ids.size and (ids.min() < info.min or ids.max() > info.max):
    bad = ids.max() if ids.max() > info.max else ids.min()
    raise ValueError(f'{what}: token id {int(bad)} outside the vocabulary')


def check_request(cfg: model_lib.ModelConfig, prompts_BxP, pad_B,
                  max_new_tokens: int, k: int):
  """Validates a decode request before any compute; raises ValueError."""
  check_k(cfg, k)
  max_new_tokens = model_lib.as_int(max_new_tokens, 'max_new_tokens', 1)
  if prompts_BxP.shape[0] == 0:
    raise ValueError('prompts: the batch is empty')
  bad = (prompts_BxP < 0) | (prompts_BxP >= cfg.vocab_size)
  if bad.any():
    raise ValueError(f'token id {int(prompts_BxP[bad][0])} outside the '
                     f'vocabulary [0, {cfg.vocab_size})')
  longest = int(prompts_BxP.shape[1] - pad_B.min())
  # When k does not divide max_new_tokens the last step runs past it; those
  # surplus tokens are dropped, so only the kept ones must fit in seq_len.
  if longest + max_new_tokens > cfg.seq_len:
    raise ValueError(
        f'prompt length {longest} + {max_new_tokens} new tokens exceeds '
        f'model.seq_len={cfg.seq_len}; shorten the prompt or max_new_tokens')


def _widen(cfg, prompts_BxP, pad_B, width, max_new_tokens):
  """More left padding, up to `width` slots (generate's prompt_width)."""
  width = model_lib.as_int(width, 'prompt_width', 1)
  p = prompts_BxP.shape[1]
  if width < p:
    raise ValueError(f'prompt_width={width} is shorter than the longest '
                     f'prompt ({p} tokens)')
  if width + int(max_new_tokens) > cfg.seq_len:
    raise ValueError(f'prompt_width={width} + {max_new_tokens} new tokens '
                     f'exceeds model.seq_len={cfg.seq_len}')
  return (np.pad(prompts_BxP, ((0, 0), (width - p, 0))),
          (pad_B + (width - p)).astype(np.int32))


def generate(params, cfg: model_lib.ModelConfig, prompts, *,
             max_new_tokens: int, k: int = 1, noise=None, rng=None,
             temperature: float = 1.0, greedy: bool = False,
             frequency_penalty: float = 0.0, eos_id: int | None = None,
             pad_id: int = 0, kernel_impl: str = 'auto',
             prompt_width: int | None = None,
             attention_impl: str = 'auto') -> GenerateOutput:
  """Decodes `max_new_tokens` per prompt, k tokens per forward pass.

  Args:
    params: model parameters (teacher or student pytree).
    cfg: its ModelConfig. noise_window == 0 means AR teacher (k must be 1).
    prompts: list of token-id lists (any lengths, left-padded here), or a
      (B, P) int array whose rows are all full prompts (no padding; pass
      lists for prompts of different lengths).
    max_new_tokens: new tokens per row (<= seq_len - longest prompt).
    k: tokens per forward pass; 1 <= k <= cfg.noise_window for a student.
    noise: (B, max_new_tokens) uniforms in [0, 1): token n uses noise[:, n].
      If None, drawn from `rng` (default PRNGKey(0)) in float32, with or
      without jax_enable_x64. Pass noise or rng, not both.
    temperature: AR sampling temperature, >= 1e-30 and finite in float32
      (near 0 it approaches greedy); ignored by students, whose noise
      encoder is fed tau = 1, but checked for them too; ignored and not
      checked under greedy=True (where 0 is fine).
    greedy: AR argmax decoding.
    frequency_penalty: lambda >= 0 of docs/METHOD.md (logit - lambda * count
      of the token so far, prompt included, slot by slot); 0 disables. At
      most `max_frequency_penalty(cfg.seq_len)`, so lambda * count stays
      finite. It applies to the AR teacher too (to its sampling or greedy
      logits).
    eos_id: stop a row after this token (a vocabulary id); None never stops
      early.
    pad_id: written after a row stops (any int32).
    kernel_impl: vocabulary projection, 'auto' | 'pallas' | 'chunked' |
      'reference' (see projection.py); argmax tokens are identical for all.
    prompt_width: left-pad every prompt to this many slots (>= the longest
      prompt; prompt_width + max_new_tokens <= seq_len). Calls whose
      prompts differ in length then share one compiled decode; None pads
      to the longest prompt of the call, so each new length compiles once.
      Padding does not change a row's tokens.
    attention_impl: cached attention, 'auto' | 'xla' | 'pallas' (see
      `attention_impl`); the same attention up to rounding, so bfloat16
      tokens can differ at near-ties.
  Returns:
    GenerateOutput(tokens (B, max_new_tokens), lengths (B,)).
  """
  if not isinstance(cfg, model_lib.ModelConfig):
    raise TypeError(
        f'cfg must be a ModelConfig, got {type(cfg).__name__}: generate '
        'takes (params, cfg, prompts); load_params returns (cfg, params, '
        'meta)')
  traced = [name for name, value in (
      ('prompts', prompts), ('noise', noise), ('rng', rng),
      ('params', params), ('temperature', temperature),
      ('frequency_penalty', frequency_penalty))
            if any(isinstance(leaf, jax.core.Tracer)
                   for leaf in jax.tree_util.tree_leaves(value))]
  if traced:
    raise TypeError(f'generate got a traced {traced[0]} (inside jax.jit or '
                    'jax.vmap?): it pads and checks on the host; under a '
                    'transform call decode_loop (see its docstring)')
  if noise is not None and rng is not None:
    raise ValueError('pass noise or rng, not both (noise is used as given, '
                     'rng only draws noise)')
  if not (isinstance(greedy, (bool, np.bool_, int, np.integer)) and
          greedy in (0, 1)):
    raise ValueError(f'greedy={greedy!r} must be a bool')
  greedy = bool(greedy)
  if isinstance(prompts, (np.ndarray, jax.Array)):
    prompts_BxP = np.asarray(prompts)
    if (prompts_BxP.ndim != 2 or prompts_BxP.dtype.kind not in 'iu' or
        not prompts_BxP.shape[1]):
      raise ValueError('prompt array must be (B, P >= 1) int token ids; got '
                       f'{prompts_BxP.dtype} {prompts_BxP.shape}')
    _check_int32(prompts_BxP, 'prompts')
    prompts_BxP = prompts_BxP.astype(np.int32)
    pad_B = np.zeros((prompts_BxP.shape[0],), np.int32)
  else:
    # Prompt padding is masked out, so its value is free: 0 is in the
    # vocabulary whatever pad_id is.
    prompts_BxP, pad_B = pad_prompts(prompts, 0)
  check_request(cfg, prompts_BxP, pad_B, max_new_tokens, k)
  if prompt_width is not None:
    prompts_BxP, pad_B = _widen(cfg, prompts_BxP, pad_B, prompt_width,
                                max_new_tokens)
  k, max_new_tokens = int(k), int(max_new_tokens)
  for name, value in (('temperature', temperature),
                      ('frequency_penalty', frequency_penalty)):
    # A bool is an int to isinstance: its result type refuses it.
    if (not isinstance(value, (int, float, np.number, jax.Array)) or
        np.ndim(value) or jnp.issubdtype(jnp.result_type(value), jnp.bool_)):
      raise ValueError(f'{name}={value!r} must be a number (one for the '
                       'whole batch)')
  # Python floats: a jax scalar would make DecodeSpec.use_penalty unhashable.
  temperature, frequency_penalty = float(temperature), float(frequency_penalty)
  # The loop computes in float32: a smaller temperature overflows
  # logits / temperature into NaN (all-zero tokens), and one beyond float32
  # is inf. Checked for students too, which ignore it: a nonsense value is
  # a caller's mistake either way. Not under greedy, where temperature=0
  # is a common way of saying argmax.
  if not greedy:
    check_sampling_temperature(temperature, 'greedy=True')
  most = max_frequency_penalty(cfg.seq_len)
  if not 0 <= frequency_penalty <= most:
    raise ValueError(f'frequency_penalty={frequency_penalty} must be in '
                     f'[0, {most:.3g}]: lambda times a count of up to '
                     f'model.seq_len={cfg.seq_len} must stay finite in '
                     'float32')
  b = prompts_BxP.shape[0]
  steps = -(-max_new_tokens // k)
  spec = DecodeSpec(model=cfg, k=k, num_steps=steps,
                    prompt_len=prompts_BxP.shape[1], greedy=greedy,
                    use_penalty=frequency_penalty != 0.0,
                    eos_id=-1 if eos_id is None else eos_id, pad_id=pad_id,
                    kernel_impl=kernel_impl, attention_impl=attention_impl)
  if noise is None:
    rng = jax.random.PRNGKey(0) if rng is None else rng
    try:
      # float32 whatever jax_enable_x64 says: float64 draws are other
      # values, so the same seed would give other tokens under x64.
      noise = jax.random.uniform(rng, (b, max_new_tokens), jnp.float32)
    except (TypeError, ValueError) as e:
      raise ValueError(f'rng={rng!r} is not a JAX PRNG key (e.g. '
                       'jax.random.PRNGKey(0) or jax.random.key(0))') from e
  noise = np.asarray(noise)
  if noise.shape != (b, max_new_tokens):
    raise ValueError(f'noise shape {noise.shape} != (batch, max_new_tokens)'
                     f' = {(b, max_new_tokens)}')
  noise_lib.check_noise(noise)  # Before the cast, so it names the input.
  # float64 values just below 1 round to 1.0 in float32; keep them in [0, 1).
  noise = np.minimum(noise.astype(np.float32),
                     np.nextafter(np.float32(1), np.float32(0)))
  # Tokens past max_new_tokens in the last step are discarded; their noise
  # value is irrelevant.
  noise = np.pad(noise, ((0, 0), (0, steps * k - max_new_tokens)),
                 constant_values=0.5)
  # Host arrays: decode_loop's value checks read them where they are (a
  # device copy would be fetched back); jit uploads them.
  tokens, lengths = decode_loop(spec, params, prompts_BxP, pad_B, noise,
                                np.float32(temperature),
                                np.float32(frequency_penalty))
  tokens = np.asarray(tokens)[:, :max_new_tokens]
  return GenerateOutput(tokens=tokens,
                        lengths=np.minimum(np.asarray(lengths),
                                           max_new_tokens))
