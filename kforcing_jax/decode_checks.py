"""Checks of decode inputs, each refusing what would otherwise decode wrong
tokens without an error or fail deep inside jax: shapes and dtypes at trace
time, values where they can be read (called outside jit), and `generate`'s
request on the host before any compute. `kforcing_jax.decode` re-exports
the API among them (its `__all__`: `check_values`, `check_pad`, ...); the
rest are the decode modules' own helpers."""

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import model as model_lib
from kforcing_jax import noise as noise_lib
from kforcing_jax.decode_spec import DecodeSpec
from kforcing_jax.decode_spec import DecodeState
from kforcing_jax.decode_spec import cache_slots
from kforcing_jax.decode_spec import check_k
from kforcing_jax.decode_spec import key_layout
from kforcing_jax.kernels import _common


# The smallest sampling temperature generate() accepts (the AR teacher's,
# a sampling or median student's): logits / temperature stays finite in
# float32 (max 3.4e38) for |logits| up to 1e8. Below it use greedy=True (or
# a student's readout='argmax'), which is the limit anyway.
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


def check_config_temperature(name: str, value, zero_means: str = '') -> None:
  """A config field's temperature, refused by name within the decoder's
  bounds (`check_sampling_temperature`); `zero_means` (e.g. 'no rows')
  also allows 0 and says what it means."""
  if zero_means and value == 0:
    return
  try:
    check_sampling_temperature(value, '')
  except ValueError:
    zero = f'0 ({zero_means}) or ' if zero_means else ''
    raise ValueError(f'{name}={value} must be {zero}finite in float32 and '
                     f'>= {MIN_TEMPERATURE:g}') from None


def max_frequency_penalty(seq_len: int) -> float:
  """The largest frequency penalty whose lambda * count stays finite in
  float32, with room for the logits: a token's count reaches at most
  seq_len. Past it every seen token's logit became -inf, and once every
  token had been seen the argmax fell back to token 0 at each step."""
  return float(np.finfo(np.float32).max) / (2 * seq_len)


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


def check_shape(name: str, x, expected: tuple[int, ...]):
  """Static shape check (free under jit): a wrong width would otherwise be
  clamped by dynamic slicing into silently wrong tokens."""
  if tuple(x.shape) != expected:
    raise ValueError(f'{name} has shape {tuple(x.shape)}; expected '
                     f'{expected}')


def check_array(name: str, x, kind, what: str):
  """Trace-time dtype check naming the argument: a list, float ids or a
  float pad otherwise failed deep in flax or jax, and bool ids decoded as
  tokens 0 and 1."""
  dtype = getattr(x, 'dtype', None)
  if dtype is None or not hasattr(x, 'shape'):
    raise ValueError(f'{name} must be an array (numpy or jax) of {what}; '
                     f'got {type(x).__name__}')
  if not jnp.issubdtype(dtype, kind):
    raise ValueError(f'{name} must hold {what}; got dtype {dtype}')


def check_inputs(prompts_BxP, pad_B, noise):
  check_array('prompts', prompts_BxP, jnp.integer, 'integer token ids')
  check_array('pad', pad_B, jnp.integer, 'integer padding lengths')
  check_array('noise', noise, jnp.floating, 'floats in [0, 1)')


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
    check_sampling_temperature(
        temperature, "readout='argmax' in the DecodeSpec" if spec.is_student
        else 'greedy=True in the DecodeSpec')


def check_cache(spec: DecodeSpec, cache, b: int):
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


def check_state(spec: DecodeSpec, state: DecodeState):
  """A state from another spec (another k, another length) would write its
  tokens at the wrong offsets without an error: refuse it at trace time.
  Checks what the arrays show (shapes, key layout, penalty counts), not
  the spec fields they do not (prompt_len, eos_id, pad_id, greedy)."""
  b = state.pending.shape[0]
  check_shape('state.pending', state.pending, (b, spec.k))
  check_shape('state.tokens', state.tokens, (b, spec.max_new_tokens))
  check_shape('state.pad', state.pad, (b,))
  check_cache(spec, state.cache, b)
  if spec.use_penalty != (state.counts is not None):
    raise ValueError(f'DecodeSpec.use_penalty={spec.use_penalty} but the '
                     'state was made by a spec with use_penalty='
                     f'{state.counts is not None}')


def check_noise_x(spec: DecodeSpec, noise_x, b: int):
  if noise_x is None:
    return
  if not spec.is_student:
    raise ValueError('noise_x is for a student; this spec is an AR '
                     "teacher's")
  check_shape('noise_x', noise_x, (b, spec.k, spec.model.d_model))


def check_room(spec: DecodeSpec, state: DecodeState) -> None:
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


def check_int32(ids, what: str):
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
