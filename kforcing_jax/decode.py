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
from the noise slot fed u[:, n], as the argmax of its logits (readout
'argmax'), drawn from its softmax with the low bits of u (readout
'sample') or as the median of its softmax in vocabulary order (readout
'median'; `DecodeSpec.readout`). The same noise therefore couples teacher
and student: a perfect argmax student reproduces the teacher's tokens.

Public step-level API (for callers that drive their own loop):
  `pad_prompts`, `init_cache`, `prefill`, `decode_step` (and `forward`, the
  raw cached pass returning logits); `decode_loop` is the whole loop as one
  jitted program and `generate` its validating front end. A bfloat16 model's
  own loop should pass `model.compute_params(cfg, params)`, made once, to
  every step, as `decode_loop` does: same tokens, no per-step weight casts.

This file is the compute and `generate`; the spec, loop state and cache
live in `decode_spec`, the input checks in `decode_checks`. Every public
name of the three (`__all__`) is importable from here (a test that
patches one must patch the module that defines it).
"""

import dataclasses
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import layouts
from kforcing_jax import model as model_lib
from kforcing_jax import noise as noise_lib
from kforcing_jax import projection
from kforcing_jax.decode_checks import MIN_TEMPERATURE
from kforcing_jax.decode_checks import check_array
from kforcing_jax.decode_checks import check_cache
from kforcing_jax.decode_checks import check_inputs
from kforcing_jax.decode_checks import check_int32
from kforcing_jax.decode_checks import check_noise_x
from kforcing_jax.decode_checks import check_pad
from kforcing_jax.decode_checks import check_penalty_tracked
from kforcing_jax.decode_checks import check_request
from kforcing_jax.decode_checks import check_room
from kforcing_jax.decode_checks import check_sampling_temperature
from kforcing_jax.decode_checks import check_shape
from kforcing_jax.decode_checks import check_state
from kforcing_jax.decode_checks import check_values
from kforcing_jax.decode_checks import max_frequency_penalty
from kforcing_jax.decode_spec import ATTENTION_IMPLS
from kforcing_jax.decode_spec import CACHE_BLOCK
from kforcing_jax.decode_spec import DecodeSpec
from kforcing_jax.decode_spec import DecodeState
from kforcing_jax.decode_spec import KEY_LAYOUTS
from kforcing_jax.decode_spec import READOUTS
from kforcing_jax.decode_spec import as_int32
from kforcing_jax.decode_spec import attention_impl
from kforcing_jax.decode_spec import cache_segments
from kforcing_jax.decode_spec import cache_slots
from kforcing_jax.decode_spec import check_k
from kforcing_jax.decode_spec import full_cache_size
from kforcing_jax.decode_spec import grow_cache
from kforcing_jax.decode_spec import init_cache
from kforcing_jax.decode_spec import key_layout
from kforcing_jax.decode_spec import pallas_misfit

# The public API, whichever of decode_spec, decode_checks and this file
# holds it.
__all__ = [
    'ATTENTION_IMPLS',
    'CACHE_BLOCK',
    'DecodeSpec',
    'DecodeState',
    'GenerateOutput',
    'KEY_LAYOUTS',
    'MIN_TEMPERATURE',
    'READOUTS',
    'attention_impl',
    'cache_segments',
    'cache_slots',
    'check_k',
    'check_pad',
    'check_penalty_tracked',
    'check_request',
    'check_sampling_temperature',
    'check_values',
    'decode_loop',
    'decode_step',
    'embed_noise',
    'forward',
    'full_cache_size',
    'generate',
    'grow_cache',
    'init_cache',
    'key_layout',
    'max_frequency_penalty',
    'pad_prompts',
    'pallas_misfit',
    'prefill',
]


def _select(spec, params, h_BxKxD, u_BxK, counts, temperature, penalty):
  """Turns the k emitting hidden states into k tokens.

  Student: argmax (its output is a deterministic function of the noise),
  or with readout 'sample' / 'median' the inverse CDF of its softmax at
  `temperature` at `noise.fine_uniform(u)` / 0.5 (still a function of the
  noise).
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
  if spec.readout != 'argmax':
    return _sample_slots(spec, w_DxV, h_BxKxD, u_BxK, counts, temperature,
                         penalty)
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


def _sample_slots(spec, w_DxV, h_BxKxD, u_BxK, counts, temperature,
                  penalty):
  """A student's sampled or median readout (DecodeSpec.readout): one
  projection for all k slots without a penalty, slot by slot with one (as
  `_select`)."""
  b, k, d = h_BxKxD.shape
  u2_BxK = noise_lib.readout_uniform(spec.readout, u_BxK)
  if counts is None:
    tok = projection.inverse_cdf(h_BxKxD.reshape(b * k, d), w_DxV,
                                 u2_BxK.reshape(b * k), spec.kernel_impl,
                                 temperature)
    return tok.reshape(b, k), None
  tokens = []
  for i in range(k):
    tok = projection.inverse_cdf(h_BxKxD[:, i], w_DxV, u2_BxK[:, i],
                                 spec.kernel_impl, temperature, counts,
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
  check_shape('pad', pad, (b,))
  if spec.is_student:
    check_shape('noise', u_BxK, (b, spec.k))
  check_cache(spec, cache, b)
  model_lib.check_params(spec.model, params)  # Shapes only: trace time.
  _, tokens_BxT = _unpad(tokens_BxT, index, pad)
  h, cache = _hidden(spec, params, tokens_BxT, u_BxK, cache, index, pad)
  return projection.logits(h, params['unembed']['kernel']), cache


def _unpad(tokens_BxT, index, pad_B):
  """(valid (B, T), tokens with 0 in padded slots) for tokens written at
  slot `index`. Padding is masked, but an id outside the vocabulary would
  embed as NaN (jnp.take fills), which leaks through the mask: never read
  it."""
  slots = index + jnp.arange(tokens_BxT.shape[1])[None]
  valid = slots >= pad_B[:, None]
  return valid, jnp.where(valid, tokens_BxT, 0)


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
  check_inputs(prompts_BxP, pad_B, noise_BxK)
  b = prompts_BxP.shape[0]
  check_shape('prompts', prompts_BxP, (b, spec.prompt_len))
  check_shape('pad', pad_B, (b,))
  check_shape('noise', noise_BxK, (b, spec.k))
  check_values(spec, prompts_BxP, pad_B, noise_BxK, temperature)
  check_noise_x(spec, noise_x, b)
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
  check_state(spec, state)
  check_array('noise', noise_BxK, jnp.floating, 'floats in [0, 1)')
  check_shape('noise', noise_BxK, state.pending.shape)
  check_noise_x(spec, noise_x, state.pending.shape[0])
  check_values(spec, noise=noise_BxK, temperature=temperature)
  check_room(spec, state)
  model_lib.check_params(spec.model, params)  # Shapes only: trace time.
  check_penalty_tracked(spec, penalty)
  h, cache = _hidden(spec, params, state.pending, noise_BxK, state.cache,
                     state.index, state.pad, noise_x)
  new, counts = _select(spec, params, h, noise_BxK, state.counts,
                        temperature, penalty)
  state = state.replace(cache=cache, index=state.index + spec.k,
                        counts=counts)
  return _record(spec, state, new)


def _loop(spec, params, prompts_BxP, pad_B, noise_BxN, temperature, penalty):
  check_inputs(prompts_BxP, pad_B, noise_BxN)
  k = spec.k
  check_shape('noise', noise_BxN,
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
  pad_id = as_int32(pad_id, 'pad_id')
  rows = []
  for i, p in enumerate(prompts):
    row = np.asarray(p)
    if row.ndim != 1 or (row.size and row.dtype.kind not in 'iu'):
      raise ValueError(f'prompt {i} must be a list of int token ids; got '
                       f'{p!r}')
    check_int32(row, f'prompt {i}')
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
             attention_impl: str = 'auto',
             readout: str = 'argmax') -> GenerateOutput:
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
    temperature: sampling temperature, >= 1e-30 and finite in float32
      (near 0 it approaches greedy): the AR teacher's, and a student's
      with readout='sample' or 'median'; an argmax student ignores it
      (its noise encoder is fed tau = 1) but it is checked for it too;
      ignored and not checked under greedy=True (where 0 is fine).
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
    readout: a student's tokens, 'argmax' (the paper's), 'sample' (its
      softmax at `temperature`, drawn with the low bits of each u) or
      'median' (the median of that softmax in vocabulary order); see
      `DecodeSpec.readout`. Only 'argmax' for an AR teacher.
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
    check_int32(prompts_BxP, 'prompts')
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
  # is inf. Checked for argmax students too, which ignore it: a nonsense
  # value is a caller's mistake either way. Not under greedy, where
  # temperature=0 is a common way of saying argmax.
  if not greedy:
    check_sampling_temperature(temperature, "readout='argmax'"
                               if cfg.noise_window else 'greedy=True')
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
                    kernel_impl=kernel_impl, attention_impl=attention_impl,
                    readout=readout)
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
