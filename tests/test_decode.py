"""AR decoding: jitted loop == full forward, padding, eos, noise coupling."""


import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kforcing_jax
from kforcing_jax import decode
from kforcing_jax import model as model_lib
from kforcing_jax import noise as noise_lib
from tests import helpers


@pytest.fixture
def teacher(small_cfg):
  return small_cfg, model_lib.init_params(small_cfg, jax.random.PRNGKey(0))


# Jitted: run op by op, every new length compiled each op of the model on
# its own, seconds per call on 2 cores.
_forward = jax.jit(decode.forward, static_argnums=0)


def _full_logits(cfg, params, seq):
  return jax.jit(model_lib.Transformer(cfg).apply)({'params': params},
                                                   jnp.asarray([seq]))[0]


def test_greedy_equals_argmax_of_full_forward(teacher):
  cfg, params = teacher
  prompts = [[5, 9, 2, 33, 7], [1, 2, 3]]
  out = decode.generate(params, cfg, prompts, max_new_tokens=10, greedy=True)
  assert out.tokens.shape == (2, 10)
  for prompt, row in zip(prompts, out.tokens):
    seq = prompt + row.tolist()
    logits = _full_logits(cfg, params, seq)
    expected = np.asarray(logits[len(prompt) - 1:-1].argmax(-1))
    np.testing.assert_array_equal(row, expected)


def test_sampling_is_inverse_cdf_of_the_given_noise(teacher):
  cfg, params = teacher
  prompt = [4, 8, 15, 16]
  noise = np.asarray(jax.random.uniform(jax.random.PRNGKey(7), (1, 12)))
  out = decode.generate(params, cfg, [prompt], max_new_tokens=12, noise=noise,
                        temperature=0.8)
  seq = prompt + out.tokens[0].tolist()
  logits = _full_logits(cfg, params, seq)[len(prompt) - 1:-1]
  expected = noise_lib.inverse_cdf(logits, jnp.asarray(noise[0]),
                                   temperature=0.8)
  np.testing.assert_array_equal(out.tokens[0], np.asarray(expected))
  again = decode.generate(params, cfg, [prompt], max_new_tokens=12,
                          noise=noise, temperature=0.8)
  np.testing.assert_array_equal(out.tokens, again.tokens)


def test_batch_of_different_lengths_equals_one_by_one(teacher):
  cfg, params = teacher
  prompts = [[3], [7, 1, 9, 12, 40, 2, 6], [8, 8, 8]]
  noise = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (3, 9)))
  batched = decode.generate(params, cfg, prompts, max_new_tokens=9,
                            noise=noise)
  for i, prompt in enumerate(prompts):
    alone = decode.generate(params, cfg, [prompt], max_new_tokens=9,
                            noise=noise[i:i + 1])
    np.testing.assert_array_equal(batched.tokens[i], alone.tokens[0])


def test_eos_stops_each_row(teacher):
  cfg, params = teacher
  prompts = [[5, 9, 2], [1, 2, 3, 4]]
  free = decode.generate(params, cfg, prompts, max_new_tokens=12, greedy=True)
  eos = int(free.tokens[0, 3])  # A token row 0 emits at position 3.
  out = decode.generate(params, cfg, prompts, max_new_tokens=12, greedy=True,
                        eos_id=eos, pad_id=0)
  for r in range(2):
    row = free.tokens[r].tolist()
    stop = row.index(eos) + 1 if eos in row else 12
    assert out.lengths[r] == stop
    np.testing.assert_array_equal(out.tokens[r, :stop], free.tokens[r, :stop])
    assert (out.tokens[r, stop:] == 0).all()


def test_tiny_temperature_is_greedy(teacher):
  cfg, params = teacher
  greedy = decode.generate(params, cfg, [[1, 2]], max_new_tokens=8,
                           greedy=True)
  cold = decode.generate(params, cfg, [[1, 2]], max_new_tokens=8,
                         temperature=1e-4)
  np.testing.assert_array_equal(greedy.tokens, cold.tokens)


@pytest.mark.parametrize('kwargs,needle', [
    (dict(prompts=[[1] * 45], max_new_tokens=8), 'prompt length 45'),
    (dict(prompts=[[1, 70]], max_new_tokens=4), 'token id 70'),
    (dict(prompts=[[1, -2]], max_new_tokens=4), 'token id -2'),
    (dict(prompts=[[1, 2]], max_new_tokens=4, k=2), 'k=2 not allowed'),
    (dict(prompts=[[]], max_new_tokens=4), 'at least one token'),
    (dict(prompts=[[1]], max_new_tokens=2, noise=np.array([[0.5, 1.0]])),
     r'noise u must be finite and in \[0, 1\).* first u\[0, 1\]=1.0'),
    (dict(prompts=[[1]], max_new_tokens=2, noise=np.zeros((1, 3))),
     'noise shape'),
    (dict(prompts=[[1]], max_new_tokens=2, temperature=0.0), 'temperature=0'),
    (dict(prompts=[[1.7, 2.2]], max_new_tokens=2), 'prompt 0 must be'),
    (dict(prompts=[1, 2, 3], max_new_tokens=2), 'prompt 0 must be'),
    (dict(prompts=np.ones((2, 3), np.float32), max_new_tokens=2),
     'int token ids'),
    (dict(prompts=np.ones((0, 3), np.int32), max_new_tokens=2),
     'batch is empty'),
    (dict(prompts=[[1]], max_new_tokens=2.0), 'max_new_tokens must be an int'),
    (dict(prompts=[[1]], max_new_tokens=2, k=True), 'k must be an int'),
    (dict(prompts=[[1]], max_new_tokens=2, frequency_penalty=float('nan')),
     'frequency_penalty=nan'),
    (dict(prompts=[[1]], max_new_tokens=2, frequency_penalty=-0.5),
     'frequency_penalty=-0.5'),
    (dict(prompts=[[1]], max_new_tokens=2, eos_id=61), 'eos_id=61'),
    # Would wrap to id 5 in a cast to int32.
    (dict(prompts=[[2**32 + 5]], max_new_tokens=2), 'token id 4294967301'),
    (dict(prompts=np.array([[2**32 + 5]]), max_new_tokens=2),
     'token id 4294967301'),
    (dict(prompts=np.ones((2, 0), np.int32), max_new_tokens=2), 'P >= 1'),
    (dict(prompts=[[1]], max_new_tokens=2, frequency_penalty=None),
     'frequency_penalty=None'),
    (dict(prompts=[[1], [2]], max_new_tokens=2,
          temperature=np.array([1.0, 0.5])), 'one for the whole batch'),
    (dict(prompts=[[1]], max_new_tokens=2, rng=3), 'rng=3 is not a JAX PRNG'),
    # Beyond float32: logits / temperature overflows, or the penalty is inf.
    (dict(prompts=[[1]], max_new_tokens=2, temperature=float('inf')),
     'temperature=inf'),
    (dict(prompts=[[1]], max_new_tokens=2, temperature=1e-45),
     'temperature=1e-45'),
    (dict(prompts=[[1]], max_new_tokens=2, frequency_penalty=1e300),
     r'frequency_penalty=1e\+300'),
    # Past float32 (passed as inf), and a bool.
    (dict(prompts=[[1]], max_new_tokens=2, temperature=1e39),
     r'temperature=1e\+39'),
    (dict(prompts=[[1]], max_new_tokens=2, temperature=True),
     'temperature=True must be a number'),
    # lambda x count overflowed to -inf on every seen token.
    (dict(prompts=[[1]], max_new_tokens=2, frequency_penalty=3e38),
     r'frequency_penalty=3e\+38 must be in \[0, 3.54e\+36\]'),
    (dict(prompts=[[1]], max_new_tokens=2, greedy='no'), "greedy='no'"),
    (dict(prompts=[[1]], max_new_tokens=2, pad_id=2**31),
     'pad_id=2147483648 is not an int32'),
    # rng was silently ignored next to noise.
    (dict(prompts=[[1]], max_new_tokens=2, noise=np.full((1, 2), 0.5),
          rng=jax.random.PRNGKey(0)), 'pass noise or rng, not both'),
])
def test_bad_requests_fail_before_compute(teacher, kwargs, needle,
                                         monkeypatch):
  cfg, params = teacher

  def must_not_run(*args, **kwargs):
    raise AssertionError('decode_loop ran: the request was not refused '
                         'before compute')

  monkeypatch.setattr(decode, 'decode_loop', must_not_run)
  with pytest.raises(ValueError, match=needle):
    decode.generate(params, cfg, **kwargs)


def test_generate_under_a_transform_points_to_decode_loop(teacher):
  # A raw TracerArrayConversionError from deep inside used to be all a
  # JAX user got for the first thing they try.
  cfg, params = teacher
  for name, call in (
      ('rng', lambda key: decode.generate(params, cfg, [[1, 2]],
                                          max_new_tokens=2, rng=key).tokens),
      ('prompts', lambda key: decode.generate(
          params, cfg, jnp.ones((1, 2), jnp.int32) + key[0].astype(jnp.int32)
          * 0, max_new_tokens=2).tokens)):
    with pytest.raises(TypeError, match=f'generate got a traced {name} .*'
                       'call decode_loop'):
      jax.jit(call)(jax.random.PRNGKey(0))


def test_concrete_jax_ints_are_ints_and_int_params_are_refused(teacher):
  cfg, params = teacher
  ref = decode.generate(params, cfg, [[1, 2]], max_new_tokens=3, greedy=True)
  got = decode.generate(params, cfg, [[1, 2]], max_new_tokens=jnp.int32(3),
                        greedy=True)
  np.testing.assert_array_equal(got.tokens, ref.tokens)
  cast = jax.tree.map(lambda x: np.asarray(x, np.int32), params)
  with pytest.raises(ValueError, match="params '.*' has dtype int32; "
                     'parameters are floats'):
    decode.generate(cast, cfg, [[1, 2]], max_new_tokens=3)


def test_decode_loop_and_prefill_refuse_a_pad_outside_the_prompt(teacher):
  # Both decoded from a shifted or empty prompt without an error.
  cfg, params = teacher
  prompts, pad = decode.pad_prompts([[1, 2, 3], [4, 5]])
  spec = decode.DecodeSpec(model=cfg, k=1, num_steps=2, prompt_len=3)
  noise = jnp.full((2, 2), 0.5)
  for bad in (pad + 3, np.array([-1, 1], np.int32)):
    with pytest.raises(ValueError, match=r'pad (-1|3|4) outside \[0, '
                       r'prompt_len=3\)'):
      decode.decode_loop(spec, params, prompts, jnp.asarray(bad), noise)
    with pytest.raises(ValueError, match=r'pad (-1|3|4) outside \[0, '
                       r'prompt_len=3\)'):
      decode.prefill(spec, params, prompts, bad, noise[:, :1])
  # Under the caller's own jit the values are unknown: not checked, runs.
  tokens, _ = jax.jit(decode.decode_loop, static_argnums=0)(
      spec, params, prompts, jnp.asarray(pad), noise)
  assert tokens.shape == (2, 2)


def test_step_level_api_refuses_values_that_decode_wrong_tokens(teacher):
  # decode_loop took temperature 0 or NaN (all token 0) and -1 (the
  # distribution flipped), noise outside [0, 1) (first or last token) and
  # an id outside the vocabulary (a NaN embedding), all without an error.
  cfg, params = teacher
  prompts, pad = decode.pad_prompts([[1, 2, 3], [4, 5]])
  spec = decode.DecodeSpec(model=cfg, k=1, num_steps=2, prompt_len=3)
  noise = jnp.full((2, 2), 0.5)
  for bad in (0.0, float('nan'), -1.0, np.float32(1e-31)):
    with pytest.raises(ValueError, match=r'temperature=.* must be finite in '
                       r'float32 and >= 1e-30'):
      decode.decode_loop(spec, params, prompts, pad, noise, bad)
    with pytest.raises(ValueError, match=r'temperature=.* must be finite'):
      decode.prefill(spec, params, prompts, pad, noise[:, :1], bad)
  for bad in (noise + 1, noise - 1, noise * np.nan):
    with pytest.raises(ValueError, match=r'noise u must be finite and in '
                       r'\[0, 1\)'):
      decode.decode_loop(spec, params, prompts, pad, bad)
    with pytest.raises(ValueError, match='noise u must be'):
      decode.prefill(spec, params, prompts, pad, bad[:, :1])
  state = decode.prefill(spec, params, prompts, pad, noise[:, :1])
  with pytest.raises(ValueError, match='noise u must be'):
    decode.decode_step(spec, params, state, noise[:, :1] + 1)
  with pytest.raises(ValueError, match='temperature=0'):
    decode.decode_step(spec, params, state, noise[:, :1], 0)
  for bad in (cfg.vocab_size, -5):
    ids = prompts.copy()
    ids[1, 2] = bad
    with pytest.raises(ValueError, match=rf'prompts\[1, 2\]: token id {bad} '
                       rf'outside the vocabulary \[0, {cfg.vocab_size}\)'):
      decode.decode_loop(spec, params, ids, pad, noise)
    with pytest.raises(ValueError, match='outside the vocabulary'):
      decode.prefill(spec, params, ids, pad, noise[:, :1])
  # A padding slot's id is never read: any value is fine there. A greedy
  # spec ignores the temperature: 0 is fine.
  ids = prompts.copy()
  ids[1, 0] = -5
  want, _ = decode.decode_loop(spec, params, prompts, pad, noise)
  np.testing.assert_array_equal(
      decode.decode_loop(spec, params, ids, pad, noise)[0], want)
  greedy = dataclasses.replace(spec, greedy=True)
  np.testing.assert_array_equal(
      decode.decode_loop(greedy, params, prompts, pad, noise, 0.0)[0],
      decode.generate(params, cfg, [[1, 2, 3], [4, 5]], max_new_tokens=2,
                      greedy=True).tokens)
  # Under the caller's jit the values are unknown: not checked, runs.
  tokens, _ = jax.jit(decode.decode_loop, static_argnums=0)(
      spec, params, prompts, pad, noise + 1)
  assert tokens.shape == (2, 2)
  # Nor in shape-only stand-ins to `.lower` (the penalty's included); a
  # bfloat16 temperature is a number.
  shapes = [jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype)
            for x in (prompts, pad, noise, 1.0, 0.0)]
  assert decode.decode_loop.lower(spec, params, *shapes).compile()
  np.testing.assert_array_equal(
      decode.decode_loop(spec, params, prompts, pad, noise,
                         jnp.bfloat16(0.5))[0],
      decode.decode_loop(spec, params, prompts, pad, noise, 0.5)[0])


def test_decode_step_past_the_spec_or_its_cache_is_refused(teacher):
  # Both ran: XLA clamped the writes, overwriting earlier tokens.
  cfg, params = teacher
  prompts, pad = decode.pad_prompts([[1, 2, 3], [4, 5]])
  spec = decode.DecodeSpec(model=cfg, k=1, num_steps=2, prompt_len=3)
  u = jnp.full((2, 1), 0.5)
  state = decode.prefill(spec, params, prompts, pad, u, cache_size=3)
  with pytest.raises(ValueError, match=r'the cache has 3 slots; this step '
                     r'needs 4 \(grow_cache\(state.cache, 4\)'):
    decode.decode_step(spec, params, state, u)
  state = state.replace(cache=decode.grow_cache(state.cache, 4))
  state = decode.decode_step(spec, params, state, u)
  with pytest.raises(ValueError, match=r'state.step=2: the spec has '
                     r'num_steps=2 \(prefill included\), all done'):
    decode.decode_step(spec, params, state, u)
  with pytest.raises(ValueError, match='cache_size=2 is smaller than the 3 '
                     r'slots the prefill writes \(prompt_len=3\)'):
    decode.prefill(spec, params, prompts, pad, u, cache_size=2)
  student = dataclasses.replace(cfg, noise_window=2)
  s_spec = decode.DecodeSpec(model=student, k=2, num_steps=2, prompt_len=3)
  with pytest.raises(ValueError, match=r'the 5 slots the prefill writes '
                     r'\(prompt_len=3 \+ k=2 noise slots\)'):
    decode.prefill(s_spec, model_lib.init_params(student,
                                                 jax.random.PRNGKey(0)),
                   prompts, pad, jnp.full((2, 2), 0.5), cache_size=4)


@pytest.mark.parametrize('kwargs, needle', [
    (dict(batch_size=2, size=0), 'cache size=0 must be >= 1'),
    (dict(batch_size=-1), 'batch_size=-1 must be >= 1'),
    (dict(batch_size=2.0), 'batch_size must be an int, got 2.0'),
])
def test_init_cache_names_a_bad_size(small_cfg, kwargs, needle):
  # size=0 gave a full-size cache; the others raw JAX shape errors.
  spec = decode.DecodeSpec(model=small_cfg, k=1, num_steps=2, prompt_len=3)
  with pytest.raises(ValueError, match=needle):
    decode.init_cache(spec, **kwargs)


def test_generate_names_a_traced_params_or_scalar_and_a_padded_pair(teacher):
  cfg, params = teacher
  # Traced params decoded the whole loop before a TracerArrayConversionError;
  # a traced temperature was a ConcretizationTypeError.
  for name, call in (
      ('params', lambda p, t: decode.generate(p, cfg, [[1, 2]],
                                              max_new_tokens=2).tokens),
      ('temperature', lambda p, t: decode.generate(
          params, cfg, [[1, 2]], max_new_tokens=2, temperature=t).tokens),
      ('frequency_penalty', lambda p, t: decode.generate(
          params, cfg, [[1, 2]], max_new_tokens=2,
          frequency_penalty=t).tokens)):
    with pytest.raises(TypeError, match=f'generate got a traced {name} '):
      jax.jit(call)(params, jnp.float32(1))
  # pad_prompts' pair was "prompt 0 must be a list of int token ids".
  with pytest.raises(ValueError, match=r'prompts is a \(prompts_BxP, pad_B\)'
                     ' pair, as pad_prompts returns'):
    decode.generate(params, cfg, decode.pad_prompts([[1, 2], [3]]),
                    max_new_tokens=2)
  with pytest.raises(ValueError, match='prompts must be a list of token-id '
                     'lists; got None'):
    decode.generate(params, cfg, None, max_new_tokens=2)


def test_tiny_temperatures_and_int_greedy_are_accepted(teacher):
  # Near 0 a temperature approaches greedy; it must not overflow before
  # MIN_TEMPERATURE.
  cfg, params = teacher
  args = dict(prompts=[[5, 9, 2], [1]], max_new_tokens=6)
  ref = decode.generate(params, cfg, greedy=True, **args).tokens
  for t in (1e-7, decode.MIN_TEMPERATURE):
    np.testing.assert_array_equal(
        decode.generate(params, cfg, temperature=t, **args).tokens, ref)
  np.testing.assert_array_equal(
      decode.generate(params, cfg, greedy=1, **args).tokens, ref)
  # Greedy ignores the temperature: 0 (a common way to ask for argmax) is
  # not refused.
  np.testing.assert_array_equal(decode.generate(
      params, cfg, greedy=True, temperature=0.0, **args).tokens, ref)


def test_the_largest_penalty_still_avoids_repeats():
  # Every token of a vocabulary of 8 seen twice: lambda x count used to
  # overflow to -inf for all of them at lambda 3e38, and greedy emitted
  # token 0 at every step. At the largest lambda allowed, each step takes
  # a least-counted token, so 6 new tokens are 6 different ones.
  cfg = model_lib.ModelConfig(vocab_size=8, seq_len=64, num_layers=1,
                              d_model=16, num_heads=2, mlp_dim=32)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  out = decode.generate(params, cfg, [list(range(8)) * 2], max_new_tokens=6,
                        greedy=True, frequency_penalty=(
                            decode.max_frequency_penalty(cfg.seq_len)))
  assert len(set(out.tokens[0].tolist())) == 6, out.tokens


@pytest.mark.parametrize('change,needle', [
    (lambda p, d, u: (p.astype(np.float32), d, u),
     'prompts must hold integer token ids; got dtype float32'),
    (lambda p, d, u: (p.astype(bool), d, u),
     'prompts must hold integer token ids; got dtype bool'),
    (lambda p, d, u: (p, d.astype(np.float32), u),
     'pad must hold integer padding lengths; got dtype float32'),
    (lambda p, d, u: (p.tolist(), d, u),
     'prompts must be an array .* got list'),
    (lambda p, d, u: (p, d, u.astype(np.int32)),
     r'noise must hold floats in \[0, 1\); got dtype int32'),
])
@pytest.mark.parametrize('entry', ['decode_loop', 'prefill'])
def test_wrong_input_types_are_named(teacher, change, needle, entry):
  # Float ids or pad failed deep in flax/jax, lists with an AttributeError,
  # and bool ids decoded as tokens 0 and 1.
  cfg, params = teacher
  prompts, pad = decode.pad_prompts([[1, 2, 3], [4]])
  noise = np.full((2, 2), 0.5, np.float32)
  spec = decode.DecodeSpec(model=cfg, k=1, num_steps=2, prompt_len=3)
  prompts, pad, noise = change(prompts, pad, noise)
  with pytest.raises(ValueError, match=needle):
    if entry == 'decode_loop':
      decode.decode_loop(spec, params, prompts, pad, noise)
    else:
      decode.prefill(spec, params, prompts, pad, noise[:, :1])


def test_decode_step_names_integer_noise(teacher):
  # Accepted silently before, decoding token 0.
  cfg, params = teacher
  prompts, pad = decode.pad_prompts([[1, 2, 3], [4]])
  spec = decode.DecodeSpec(model=cfg, k=1, num_steps=2, prompt_len=3)
  state = decode.prefill(spec, params, prompts, pad,
                         np.full((2, 1), 0.5, np.float32))
  with pytest.raises(ValueError, match='noise must hold floats'):
    decode.decode_step(spec, params, state, np.zeros((2, 1), np.int32))


@pytest.mark.parametrize('k', [1, 2])
def test_prompt_width_shares_one_program_and_keeps_the_tokens(
    small_cfg, monkeypatch, k):
  # Without prompt_width each new longest prompt is a new DecodeSpec (a
  # jit static argument) and so a new compile.
  cfg = dataclasses.replace(small_cfg, noise_window=2 if k > 1 else 0)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  calls, real = [], decode.decode_loop
  def recording(spec, params, prompts, pad, noise, *rest):
    calls.append((spec, prompts.shape, pad.shape, noise.shape))
    return real(spec, params, prompts, pad, noise, *rest)
  monkeypatch.setattr(decode, 'decode_loop', recording)
  args = dict(max_new_tokens=8, k=k, greedy=True)
  for prompts in ([[5, 9, 2]], [[7, 1, 3, 3, 8]],
                  np.asarray([[4, 4, 6, 1]])):
    wide = decode.generate(params, cfg, prompts, prompt_width=10, **args)
    narrow = decode.generate(params, cfg, prompts, **args)
    np.testing.assert_array_equal(wide.tokens, narrow.tokens)
  assert calls[0] == calls[2] == calls[4]  # The prompt_width=10 calls.
  assert calls[0][0].prompt_len == 10 and calls[1][0].prompt_len == 3


@pytest.mark.parametrize('width,needle', [
    (2, 'prompt_width=2 is shorter than the longest prompt \\(3 tokens\\)'),
    (45, 'prompt_width=45 \\+ 4 new tokens exceeds model.seq_len=48'),
    (0, 'prompt_width'),
])
def test_bad_prompt_widths_are_named(teacher, width, needle):
  cfg, params = teacher
  with pytest.raises(ValueError, match=needle):
    decode.generate(params, cfg, [[1, 2, 3]], max_new_tokens=4,
                    prompt_width=width)


def test_pad_prompts_to_a_width():
  prompts, pad = decode.pad_prompts([[1, 2], [3]], pad_id=9, width=4)
  np.testing.assert_array_equal(prompts, [[9, 9, 1, 2], [9, 9, 9, 3]])
  np.testing.assert_array_equal(pad, [2, 3])
  with pytest.raises(ValueError, match='width=1 is shorter'):
    decode.pad_prompts([[1, 2]], width=1)


def test_swapped_params_and_config_are_named(teacher):
  cfg, params = teacher
  with pytest.raises(TypeError, match='cfg must be a ModelConfig, got dict'):
    decode.generate(cfg, params, [[1]], max_new_tokens=2)


@pytest.mark.parametrize('k', [1, 2])
def test_prompt_padding_value_is_never_read(small_cfg, k):
  # An id outside the vocabulary embeds as NaN, which leaked through the
  # padding mask into every token of the padded row.
  cfg = dataclasses.replace(small_cfg, noise_window=2 if k > 1 else 0)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  noise = jax.random.uniform(jax.random.PRNGKey(1), (2, 8))
  outs = []
  for pad_id in (0, -1, cfg.vocab_size, 10**6):
    prompts, pad = decode.pad_prompts([[12, 7, 9], [5]], pad_id=pad_id)
    spec = decode.DecodeSpec(model=cfg, k=k, num_steps=8 // k,
                             prompt_len=prompts.shape[1])
    outs.append(np.asarray(decode.decode_loop(spec, params, prompts, pad,
                                              noise, 1.0, 0.0)[0]))
  for out in outs[1:]:
    np.testing.assert_array_equal(out, outs[0])
  # Row 1 as the only prompt (no padding) decodes the same tokens.
  alone = decode.generate(params, cfg, [[5]], max_new_tokens=8, k=k,
                          noise=noise[1:])
  np.testing.assert_array_equal(outs[0][1], alone.tokens[0])


def test_penalty_without_counts_is_refused(teacher):
  # A spec without use_penalty has no counts and would ignore the penalty.
  cfg, params = teacher
  prompts, pad = decode.pad_prompts([[4, 5, 6]])
  spec = decode.DecodeSpec(model=cfg, k=1, num_steps=4, prompt_len=3)
  noise = jnp.full((1, 4), 0.5)
  for call in (lambda: decode.decode_loop(spec, params, prompts, pad, noise,
                                          1.0, 0.5),
               lambda: decode.decode_loop.lower(spec, params, prompts, pad,
                                                noise, 1.0, 0.5),
               lambda: decode.prefill(spec, params, prompts, pad,
                                      noise[:, :1], 1.0, jnp.float32(0.5))):
    with pytest.raises(ValueError, match='penalty=.*use_penalty=False'):
      call()
  state = decode.prefill(spec, params, prompts, pad, noise[:, :1])
  with pytest.raises(ValueError, match='use_penalty=False'):
    decode.decode_step(spec, params, state, noise[:, 1:2], 1.0, 0.5)
  # Zero is fine, and so is a traced penalty inside the caller's jit.
  decode.decode_loop(spec, params, prompts, pad, noise, 1.0, 0.0)
  # The rest of the jitted function's interface is still there.
  tokens, _ = decode.decode_loop.eval_shape(spec, params, prompts, pad,
                                            noise, 1.0, 0.0)
  assert tokens.shape == (1, 4)
  jax.jit(lambda p: decode.decode_loop(spec, params, prompts, pad, noise,
                                       1.0, p))(0.5)


def test_params_of_another_config_are_rejected(teacher):
  # Without the check, deeper params decode with the config's first layers
  # and a student's params run as a teacher, silently.
  cfg, params = teacher
  deeper = model_lib.init_params(dataclasses.replace(cfg, num_layers=3),
                                 jax.random.PRNGKey(0))
  student = model_lib.init_params(dataclasses.replace(cfg, noise_window=2),
                                  jax.random.PRNGKey(0))
  wider = model_lib.init_params(dataclasses.replace(cfg, mlp_dim=128),
                                jax.random.PRNGKey(0))
  for other, needle in [(deeper, "params have 'block_2/"),
                        (student, 'params have .*noise_encoder'),
                        (wider, 'has shape')]:
    with pytest.raises(ValueError, match=needle):
      decode.generate(other, cfg, [[1, 2]], max_new_tokens=2)
  with pytest.raises(ValueError, match='params lack .*noise_encoder'):
    decode.generate(params, dataclasses.replace(cfg, noise_window=2),
                    [[1, 2]], max_new_tokens=2, k=2)
  # The jitted loop checks too (at trace time), for callers that skip
  # generate.
  spec = decode.DecodeSpec(model=cfg, k=1, num_steps=2, prompt_len=2)
  prompts, pad = decode.pad_prompts([[1, 2]])
  with pytest.raises(ValueError, match="params have 'block_2/"):
    decode.decode_loop(spec, deeper, prompts, pad, jnp.full((1, 2), 0.5),
                       jnp.float32(1), jnp.float32(0))


def test_numpy_ints_jax_scalars_and_pad_id_outside_the_vocabulary(teacher):
  cfg, params = teacher
  prompts = [[5, 9, 2], [1]]
  ref = decode.generate(params, cfg, prompts, max_new_tokens=6, greedy=True)
  got = decode.generate(params, cfg, prompts, max_new_tokens=np.int64(6),
                        k=np.int32(1), greedy=True)
  np.testing.assert_array_equal(got.tokens, ref.tokens)
  # pad_id only marks output after eos; prompt padding is masked whatever
  # its value, so -1 must not be taken for a prompt token.
  eos = int(ref.tokens[0, 1])
  stopped = decode.generate(params, cfg, prompts, max_new_tokens=6,
                            greedy=True, eos_id=eos, pad_id=-1)
  np.testing.assert_array_equal(stopped.tokens[0, :2], ref.tokens[0, :2])
  assert (stopped.tokens[0, 2:] == -1).all()
  # jax scalars for the float arguments (jit-friendly callers pass them).
  as_jax = decode.generate(params, cfg, prompts, max_new_tokens=6,
                           temperature=jnp.float32(0.7),
                           frequency_penalty=jnp.float32(0.2))
  as_py = decode.generate(params, cfg, prompts, max_new_tokens=6,
                          temperature=0.7, frequency_penalty=0.2)
  np.testing.assert_array_equal(as_jax.tokens, as_py.tokens)
  spec = decode.DecodeSpec(model=cfg, k=np.int64(1), num_steps=np.int32(3),
                           prompt_len=2)
  assert spec == decode.DecodeSpec(model=cfg, k=1, num_steps=3, prompt_len=2)
  assert hash(spec) == hash(decode.DecodeSpec(model=cfg, k=1, num_steps=3,
                                              prompt_len=2))


def test_float64_noise_just_below_one_is_accepted(teacher):
  # 1 - 1e-8 is in [0, 1) but rounds to 1.0 in float32.
  cfg, params = teacher
  noise = np.array([[1 - 1e-8, 0.5]])
  out = decode.generate(params, cfg, [[3, 4]], max_new_tokens=2, noise=noise)
  top = decode.generate(params, cfg, [[3, 4]], max_new_tokens=2,
                        noise=np.array([[np.nextafter(np.float32(1),
                                                      np.float32(0)), 0.5]]))
  np.testing.assert_array_equal(out.tokens, top.tokens)


@pytest.mark.parametrize('window,overrides,needle', [
    (0, dict(k=2), 'k=2 not allowed for an AR teacher'),
    (4, dict(k=5), 'k=5 not allowed for a student trained with window 4'),
    (4, dict(k=0), 'DecodeSpec.k=0 must be >= 1'),
    (0, dict(num_steps=0), 'DecodeSpec.num_steps=0'),
    (0, dict(prompt_len=0), 'DecodeSpec.prompt_len=0'),
    (0, dict(k=1.0), 'DecodeSpec.k must be an int'),
    (0, dict(eos_id=61), 'eos_id=61 outside the vocabulary'),
    (0, dict(key_layout='bshk'), "key_layout='bshk'"),
    (0, dict(kernel_impl='cuda'), "kernels.impl='cuda'"),
    (0, dict(pad_id=2**31), 'pad_id=2147483648 is not an int32'),
    (0, dict(greedy='no'), "greedy must be a Python bool, got 'no'"),
    (0, dict(use_penalty=jnp.bool_(True)), 'use_penalty must be a Python'),
    (4, dict(readout='top_p'), "readout='top_p': expected one of"),
    (0, dict(readout='sample'), "readout='sample' is for students"),
    (4, dict(readout='sample', greedy=True), 'greedy decode takes the argmax'),
    (0, dict(readout='median'), "readout='median' is for students"),
])
def test_bad_decode_spec_is_rejected(small_cfg, window, overrides, needle):
  # decode_loop trusts its spec, so a bad one must fail when it is built.
  cfg = dataclasses.replace(small_cfg, noise_window=window)
  fields = dict(model=cfg, k=1, num_steps=4, prompt_len=3) | overrides
  with pytest.raises(ValueError, match=needle):
    decode.DecodeSpec(**fields)


def test_step_api_checks_array_shapes_against_the_spec(small_cfg):
  # Dynamic slicing would clamp a wrong width into wrong tokens.
  cfg = dataclasses.replace(small_cfg, noise_window=4)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  prompts, pad = decode.pad_prompts([[4, 5, 6], [9]])
  spec = decode.DecodeSpec(model=cfg, k=2, num_steps=4, prompt_len=3)
  u = jnp.full((2, 8), 0.5)
  one, zero = jnp.float32(1), jnp.float32(0)
  with pytest.raises(ValueError, match=r'noise has shape \(2, 4\); expected '
                     r'\(2, 8\)'):
    decode.decode_loop(spec, params, prompts, pad, u[:, :4], one, zero)
  with pytest.raises(ValueError, match=r'prompts has shape \(2, 3\); '
                     r'expected \(2, 5\)'):
    decode.decode_loop(dataclasses.replace(spec, prompt_len=5), params,
                       prompts, pad, u, one, zero)
  with pytest.raises(ValueError, match=r'noise has shape \(2, 1\)'):
    decode.prefill(spec, params, prompts, pad, u[:, :1])
  state = decode.prefill(spec, params, prompts, pad, u[:, :2])
  with pytest.raises(ValueError, match=r'noise has shape \(2, 3\)'):
    decode.decode_step(spec, params, state, u[:, :3])


def test_step_level_api_drives_its_own_loop(teacher):
  cfg, params = teacher
  prompts, pad = decode.pad_prompts([[4, 5, 6], [9]])
  spec = decode.DecodeSpec(model=cfg, k=1, num_steps=5,
                           prompt_len=prompts.shape[1], greedy=True)
  noise = jnp.full((2, 5), 0.5)
  state = decode.prefill(spec, params, jnp.asarray(prompts),
                         jnp.asarray(pad), noise[:, :1])
  step = jax.jit(decode.decode_step, static_argnums=0)
  for i in range(1, 5):
    state = step(spec, params, state, noise[:, i:i + 1])
  ref = decode.generate(params, cfg, [[4, 5, 6], [9]], max_new_tokens=5,
                        greedy=True)
  np.testing.assert_array_equal(np.asarray(state.tokens), ref.tokens)


def test_student_steps_with_or_without_embedded_noise_equal_the_loop(
    small_cfg):
  # decode_loop embeds all its noise before the loop (noise_x); the step
  # API embeds per step unless given noise_x. All three give one output.
  cfg = dataclasses.replace(small_cfg, noise_window=4)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(5))
  prompts, pad = decode.pad_prompts([[4, 5, 6], [9]])
  prompts, pad = jnp.asarray(prompts), jnp.asarray(pad)
  k, steps = 2, 4
  spec = decode.DecodeSpec(model=cfg, k=k, num_steps=steps, prompt_len=3)
  u = jax.random.uniform(jax.random.PRNGKey(6), (2, k * steps))
  loop_tokens, _ = decode.decode_loop(spec, params, prompts, pad, u, 1.0,
                                      0.0)
  emb = decode.embed_noise(spec, params, u)
  assert emb.shape == (2, k * steps, cfg.d_model)
  step = jax.jit(decode.decode_step, static_argnums=0)
  for given in (False, True):
    x = (lambda i: emb[:, i * k:(i + 1) * k]) if given else (lambda i: None)
    state = decode.prefill(spec, params, prompts, pad, u[:, :k],
                           noise_x=x(0))
    for i in range(1, steps):
      state = step(spec, params, state, u[:, i * k:(i + 1) * k],
                   noise_x=x(i))
    np.testing.assert_array_equal(np.asarray(state.tokens),
                                  np.asarray(loop_tokens))
  with pytest.raises(ValueError, match=r'noise_x has shape \(2, 3, '):
    decode.prefill(spec, params, prompts, pad, u[:, :k],
                   noise_x=emb[:, :3])
  teacher_spec = decode.DecodeSpec(model=small_cfg, k=1, num_steps=2,
                                   prompt_len=3)
  teacher_params = model_lib.init_params(small_cfg, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match='noise_x is for a student'):
    decode.prefill(teacher_spec, teacher_params, prompts, pad, u[:, :1],
                   noise_x=emb[:, :1])


def _loop_dots(spec, params):
  """Number of dot_general equations inside decode_loop's while bodies."""
  def walk(jaxpr, inside):
    n = 0
    for eqn in jaxpr.eqns:
      n += inside and eqn.primitive.name == 'dot_general'
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        n += walk(sub, inside or eqn.primitive.name == 'while')
    return n
  b, p = 1, spec.prompt_len
  closed = jax.make_jaxpr(decode._loop, static_argnums=0)(
      spec, params, jnp.zeros((b, p), jnp.int32), jnp.zeros((b,), jnp.int32),
      jnp.full((b, spec.num_steps * spec.k), 0.5), 1.0, 0.0)
  return walk(closed.jaxpr, False)


def test_decode_loop_embeds_the_noise_outside_its_steps(small_cfg):
  # The noise encoder reads only u; per step it would cost k rows of an
  # MLP on the latency-bound path (k=4 / AR at batch 1 on a 2-core CPU:
  # 1.57-1.59 with it, 1.66-1.67 without; README). So a student's step has
  # the teacher's matmuls, no more.
  cfg = dataclasses.replace(small_cfg, noise_window=4)
  student = decode.DecodeSpec(model=cfg, k=2, num_steps=4, prompt_len=3,
                              cache_block=0)
  teacher = decode.DecodeSpec(model=small_cfg, k=1, num_steps=4,
                              prompt_len=3, cache_block=0, greedy=True)
  dots = _loop_dots(teacher, model_lib.init_params(small_cfg,
                                                   jax.random.PRNGKey(0)))
  assert dots >= 4 * small_cfg.num_layers  # The walk sees the step.
  assert _loop_dots(student, model_lib.init_params(
      cfg, jax.random.PRNGKey(0))) == dots


def _window4_case(small_cfg):
  """A window-4 student, a prompt and noise for 3 steps of k=4."""
  cfg = dataclasses.replace(small_cfg, noise_window=4)
  noise = np.asarray(jax.random.uniform(jax.random.PRNGKey(4), (1, 12)),
                     np.float32)
  return (cfg, model_lib.init_params(cfg, jax.random.PRNGKey(3)),
          [5, 9, 2, 33, 7], noise)


def _uncached_student_reference(cfg, params, prompt, noise, k, steps, pick):
  """Tokens of an uncached reference decode: one pass over [context | k
  noise slots] per step, then slot by slot `pick(logits, counts, n)` for
  token n, with counts of the prompt and every earlier token (earlier slots
  of the same step included)."""
  seq = list(prompt)
  counts = np.bincount(prompt, minlength=cfg.vocab_size).astype(np.float32)
  for step in range(steps):
    spec = decode.DecodeSpec(model=cfg, k=k, num_steps=1, prompt_len=len(seq))
    logits, _ = _forward(
        spec, params, jnp.asarray([seq]),
        jnp.asarray(noise[:, step * k:(step + 1) * k]),
        decode.init_cache(spec, 1), 0, jnp.zeros((1,), jnp.int32))
    for i in range(k):
      tok = pick(np.asarray(logits[0, i]), counts, step * k + i)
      counts[tok] += 1
      seq.append(tok)
  return seq[len(prompt):]


@pytest.mark.parametrize('impl', ['reference', 'chunked'])
def test_student_penalty_is_applied_slot_by_slot(small_cfg, impl):
  # The penalised argmax slot by slot, against the uncached reference.
  cfg, params, prompt, noise = _window4_case(small_cfg)
  k, steps, penalty = 4, 3, 0.7
  got = decode.generate(params, cfg, [prompt], max_new_tokens=k * steps, k=k,
                        noise=noise, frequency_penalty=penalty,
                        kernel_impl=impl).tokens[0]
  want = _uncached_student_reference(
      cfg, params, prompt, noise, k, steps,
      lambda logits, counts, _: int(np.argmax(
          logits.astype(np.float64) - penalty * counts.astype(np.float64))))
  np.testing.assert_array_equal(got, want)
  # The penalty must matter here, or this test checks nothing.
  plain = decode.generate(params, cfg, [prompt], max_new_tokens=k * steps,
                          k=k, noise=noise).tokens[0]
  assert not np.array_equal(plain, got)


@pytest.mark.parametrize('readout', ['sample', 'median'])
@pytest.mark.parametrize('penalty,impl', [(0.0, 'reference'),
                                          (0.7, 'reference'),
                                          (0.7, 'chunked')])
def test_sampled_and_median_readouts_are_the_inverse_cdf(small_cfg, penalty,
                                                         impl, readout):
  # Against the uncached reference: slot by slot the inverse CDF of the
  # (penalised) logits at temperature 0.8, at the low bits of the slot's u
  # ('sample') or at 0.5 ('median').
  cfg, params, prompt, noise = _window4_case(small_cfg)
  k, steps, temperature = 4, 3, 0.8
  got = decode.generate(params, cfg, [prompt], max_new_tokens=k * steps, k=k,
                        noise=noise, frequency_penalty=penalty,
                        temperature=temperature, readout=readout,
                        kernel_impl=impl).tokens[0]
  u2 = (np.asarray(noise_lib.fine_uniform(noise[0])) if readout == 'sample'
        else np.full(noise.shape[1], 0.5, np.float32))
  want = _uncached_student_reference(
      cfg, params, prompt, noise, k, steps,
      lambda logits, counts, n: int(noise_lib.inverse_cdf(
          logits - penalty * counts, u2[n], temperature=temperature)))
  np.testing.assert_array_equal(got, want)
  # The readout and its temperature must matter here, or this test checks
  # nothing.
  argmax = decode.generate(params, cfg, [prompt], max_new_tokens=k * steps,
                           k=k, noise=noise, frequency_penalty=penalty,
                           kernel_impl=impl).tokens[0]
  assert not np.array_equal(argmax, got)
  at_one = decode.generate(params, cfg, [prompt], max_new_tokens=k * steps,
                           k=k, noise=noise, frequency_penalty=penalty,
                           readout=readout, kernel_impl=impl).tokens[0]
  assert not np.array_equal(at_one, got)


@pytest.mark.parametrize('k', [1, 3])
def test_growing_cache_equals_full_size_cache(small_cfg, k):
  # The loop's cache grows in blocks (DecodeSpec.cache_block); attention
  # over a smaller cache must give the same tokens as over the full one.
  (_, full), (grown_spec, grown) = helpers.decode_variants(
      small_cfg, k, [{'cache_block': 0}, {'cache_block': 4}], seed=5)
  assert len(grown_spec.segments()) > 2  # The test must cross segments.
  np.testing.assert_array_equal(full[0], grown[0])
  np.testing.assert_array_equal(full[1], grown[1])


@pytest.mark.parametrize('k', [1, 3])
def test_key_layouts_give_the_same_tokens(small_cfg, k):
  # DecodeSpec.key_layout only changes how keys are stored.
  (k_spec, k_out), (kt_spec, kt_out) = helpers.decode_variants(
      small_cfg, k, [{'key_layout': 'k'}, {'key_layout': 'kt'}], seed=7)
  assert 'k' in decode.init_cache(k_spec, 2, 8)[0]
  assert 'kt' in decode.init_cache(kt_spec, 2, 8)[0]
  np.testing.assert_array_equal(k_out[0], kt_out[0])
  np.testing.assert_array_equal(k_out[1], kt_out[1])


@pytest.mark.parametrize('backend, k, expected', [
    ('cpu', 1, 'k'), ('cpu', 3, 'kt'), ('gpu', 3, 'k'), ('tpu', 3, 'k'),
    ('gpu', 1, 'k')])
def test_auto_key_layout_is_the_faster_one_per_backend(
    small_cfg, monkeypatch, backend, k, expected):
  # 'kt' helps push-forward steps on XLA:CPU only; on an H100 'k' was
  # faster (decode.key_layout).
  cfg = dataclasses.replace(small_cfg, noise_window=4)
  spec = decode.DecodeSpec(model=cfg, k=k, num_steps=2, prompt_len=3)
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  assert decode.key_layout(spec) == expected
  assert list(decode.init_cache(spec, 2, 8)[0]) == [expected, 'v']
  forced = dataclasses.replace(spec, key_layout='kt')
  assert decode.key_layout(forced) == 'kt'


def _while_body_weight_casts(spec, params, batch):
  """(float32 -> other converts of a >= 2-D block weight's shape inside the
  decode loop's while bodies, the same outside them), from the jaxpr."""
  shapes = {leaf.shape for name, leaf in jax.tree_util.tree_leaves_with_path(
      params) if leaf.ndim >= 2 and 'block_' in jax.tree_util.keystr(name)}
  p, n = spec.prompt_len, spec.num_steps * spec.k
  jaxpr = jax.make_jaxpr(decode._loop, static_argnums=0)(  # pylint: disable=protected-access
      spec, params, jnp.zeros((batch, p), jnp.int32),
      jnp.zeros((batch,), jnp.int32), jnp.full((batch, n), 0.5), 1.0, 0.0)
  counts = [0, 0]  # [inside, outside]

  def walk(jaxpr, inside):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'convert_element_type':
        aval = eqn.invars[0].aval
        if aval.dtype == jnp.float32 and aval.shape in shapes:
          counts[0 if inside else 1] += 1
      for sub in _subjaxprs(eqn.params):
        walk(sub, inside or eqn.primitive.name == 'while')
  walk(jaxpr.jaxpr, False)
  return tuple(counts)


def _subjaxprs(params):
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else [value]:
      if hasattr(v, 'jaxpr') and hasattr(v.jaxpr, 'eqns'):
        yield v.jaxpr  # ClosedJaxpr
      elif hasattr(v, 'eqns'):
        yield v


@pytest.mark.parametrize('k', [1, 3])
def test_bfloat16_loop_casts_block_weights_once_not_per_step(small_cfg, k):
  # A bf16 layer casts its float32 weights on every call; in the loop that
  # was 6 converts per layer per step (on an H100 over a third of an AR
  # step's kernel time at batch 8). decode_loop casts them once, before it.
  cfg = dataclasses.replace(small_cfg, dtype='bfloat16',
                            noise_window=4 if k > 1 else 0)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  spec = decode.DecodeSpec(model=cfg, k=k, num_steps=4, prompt_len=3,
                           greedy=True)
  inside, outside = _while_body_weight_casts(spec, params, 2)
  assert inside == 0
  # Each block weight once (the noise encoder's same-shaped weights too).
  assert outside >= 6 * cfg.num_layers


@pytest.mark.parametrize('k', [1, 3])
def test_bfloat16_loop_equals_steps_with_stored_weights(small_cfg, k):
  # Casting the weights ahead must not change a token: decode_loop (cast
  # once) against prefill/decode_step given the stored float32 weights.
  # XLA:CPU only: on an H100 (jax 0.11.2) the step path's gemms, fed
  # float32 weights with the convert fused, rounded differently and one
  # near-tie in 24 greedy tokens flipped; the logits test below checks
  # other backends to bfloat16 tolerance instead.
  if jax.default_backend() != 'cpu':
    pytest.skip('bitwise-equal tokens hold for XLA:CPU only')
  cfg = dataclasses.replace(small_cfg, dtype='bfloat16',
                            noise_window=4 if k > 1 else 0)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(3))
  prompts, pad = decode.pad_prompts([[5, 9, 2, 33, 7], [1, 2]])
  prompts, pad = jnp.asarray(prompts), jnp.asarray(pad)
  steps = 12 // k
  spec = decode.DecodeSpec(model=cfg, k=k, num_steps=steps, greedy=True,
                           prompt_len=prompts.shape[1], cache_block=0)
  noise = jax.random.uniform(jax.random.PRNGKey(4), (2, steps * k))
  tokens, _ = decode.decode_loop(spec, params, prompts, pad, noise)
  noise_x = (decode.embed_noise(spec, params, noise) if k > 1
             else jnp.zeros((2, steps * k, 0)))
  x = lambda s: noise_x[:, s * k:(s + 1) * k] if k > 1 else None
  state = decode.prefill(spec, params, prompts, pad, noise[:, :k],
                         noise_x=x(0))
  for s in range(1, steps):
    state = decode.decode_step(spec, params, state,
                               noise[:, s * k:(s + 1) * k], noise_x=x(s))
  np.testing.assert_array_equal(tokens, state.tokens)


@pytest.mark.parametrize('k', [1, 3])
def test_compute_params_gives_equal_logits_and_cache(small_cfg, k):
  # Stronger than equal tokens: a weight cast that the layers would not
  # make themselves (a norm, the unembedding) changes logits, not always
  # the argmax. Jitted, as decode_loop runs it. Every weight is perturbed:
  # fresh LayerNorm scales (1) and biases (0) survive a bfloat16 cast.
  # Bitwise on CPU. Elsewhere to bfloat16 rounding: a GPU may tune a gemm
  # fed float32 weights (convert fused) differently from one fed bfloat16.
  cfg = dataclasses.replace(small_cfg, dtype='bfloat16',
                            noise_window=4 if k > 1 else 0)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(5))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(8), len(leaves))
  params = jax.tree.unflatten(tree, [
      x + 0.05 * jax.random.normal(key, x.shape, x.dtype)
      for x, key in zip(leaves, keys)])
  spec = decode.DecodeSpec(model=cfg, k=k, num_steps=4, prompt_len=5,
                           greedy=True)
  tokens = jax.random.randint(jax.random.PRNGKey(6), (2, 5), 0,
                              cfg.vocab_size)
  u = (jax.random.uniform(jax.random.PRNGKey(7), (2, k)) if k > 1
       else jnp.zeros((2, 0)))
  run = jax.jit(lambda p: decode.forward(
      spec, p, tokens, u, decode.init_cache(spec, 2), 0,
      jnp.zeros((2,), jnp.int32)))
  (logits, cache), (logits_cast, cache_cast) = (
      run(params), run(model_lib.compute_params(cfg, params)))
  pairs = [(logits, logits_cast)] + list(
      zip(jax.tree.leaves(cache), jax.tree.leaves(cache_cast)))
  for a, b in pairs:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if jax.default_backend() == 'cpu':
      np.testing.assert_array_equal(a, b)
    else:  # A few bfloat16 ulps (2^-8 relative each) of the largest value.
      np.testing.assert_allclose(a, b, rtol=0,
                                 atol=2**-5 * np.abs(a).max())


def _compiled_loop_text(spec, params, batch):
  p = spec.prompt_len
  return decode.decode_loop.lower(
      spec, params, jnp.zeros((batch, p), jnp.int32),
      jnp.zeros((batch,), jnp.int32),
      jnp.full((batch, spec.num_steps * spec.k), 0.5), 1.0, 0.0).compile(
      ).as_text()


def _computation(text, name):
  start = text.index(f'\n%{name} ')
  return text[start:text.index('\n}\n', start)]


def _cache_copies_per_step(spec, params, batch):
  """Copies of a whole KV-cache buffer in the compiled loop's while bodies."""
  text = _compiled_loop_text(spec, params, batch)
  hlo_types = {'float32': 'f32', 'bfloat16': 'bf16', 'float16': 'f16'}
  shapes = {hlo_types[x.dtype.name] + r'\[' + ','.join(map(str, x.shape))
            + r'\]' for x in decode.init_cache(spec, batch)[0].values()}
  bodies = re.findall(r'body=%([\w.\-]+)', text)
  count = 0
  for body in bodies:
    block = _computation(text, body)
    count += sum(len(re.findall(rf'= {s}[^ ]* copy\(', block))
                 for s in shapes)
  return count, len(bodies)


def _ops_in_loop_steps(text, op_names):
  """How many of `op_names` the while bodies run, fusions and calls
  followed (computations named by calls= / to_apply= / body= /
  condition= / branch_computations=)."""
  seen, todo, count = set(), re.findall(r'body=%([\w.\-]+)', text), 0
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    block = _computation(text, name)
    count += sum(len(re.findall(rf'\b{op}\(', block)) for op in op_names)
    todo += re.findall(r'(?:calls|to_apply|body|condition)=%([\w.\-]+)',
                       block)
    for branches in re.findall(r'branch_computations=\{([^}]*)\}', block):
      todo += re.findall(r'%([\w.\-]+)', branches)
  return count, len(seen)


@pytest.mark.parametrize('k', [1, 3])
def test_decode_steps_compute_no_sine_or_cosine(small_cfg, k):
  # RoPE angles come from a table made on the host, and a student's noise
  # encoder runs once before the loop: computed in the step, XLA:CPU fused
  # sin/cos into every layer's rotation and recomputed them per head
  # (k=4 decoding 16-18% fewer tokens/s at batch 1-64 on the demo).
  cfg = dataclasses.replace(small_cfg, noise_window=k if k > 1 else 0)
  spec = decode.DecodeSpec(model=cfg, k=k, num_steps=4, prompt_len=3,
                           greedy=True, cache_block=0)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  text = _compiled_loop_text(spec, params, 2)
  count, computations = _ops_in_loop_steps(text, ('sine', 'cosine'))
  assert computations > 1  # The while body and what it calls.
  assert count == 0
  # The search does find them where they are: the whole program.
  assert re.search(r'\bcosine\(', text) or k == 1


@pytest.mark.parametrize('batch', [1, 2])
def test_ar_loop_does_not_copy_its_cache_every_step(small_cfg, batch):
  # With a (B, H, S, K) cache at batch 1, XLA:CPU copied every cache buffer
  # several times per step (about a fifth of an AR step at batch 1); the
  # (B*H, S, K) layout updates it in place.
  spec = decode.DecodeSpec(model=small_cfg, k=1, num_steps=6, prompt_len=3,
                           greedy=True, cache_block=0)
  params = model_lib.init_params(small_cfg, jax.random.PRNGKey(0))
  copies, loops = _cache_copies_per_step(spec, params, batch)
  assert loops >= 1
  assert copies == 0


def test_student_ragged_batch_with_penalty_equals_one_by_one(small_cfg):
  # Left padding must not count as prompt tokens for the penalty (pad id 0
  # is a real vocabulary id), nor change any row's tokens.
  cfg = dataclasses.replace(small_cfg, noise_window=4)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(11))
  prompts = [[3], [7, 1, 9, 12, 40, 2, 6], [8, 8, 8]]
  noise = np.asarray(jax.random.uniform(jax.random.PRNGKey(12), (3, 12)))
  kw = dict(max_new_tokens=12, k=3, frequency_penalty=0.3)
  batched = decode.generate(params, cfg, prompts, noise=noise, **kw)
  for i, prompt in enumerate(prompts):
    alone = decode.generate(params, cfg, [prompt], noise=noise[i:i + 1], **kw)
    np.testing.assert_array_equal(batched.tokens[i], alone.tokens[0])
  # Directly: after prefill the counts are the real prompt tokens plus the
  # first k emitted ones; the padding (id 0 here) is not among them.
  padded, pad = decode.pad_prompts(prompts)
  spec = decode.DecodeSpec(model=cfg, k=3, num_steps=4,
                           prompt_len=padded.shape[1], use_penalty=True)
  state = decode.prefill(spec, params, jnp.asarray(padded), jnp.asarray(pad),
                         jnp.asarray(noise[:, :3]), penalty=0.3)
  for i, prompt in enumerate(prompts):
    expected = np.bincount(prompt + np.asarray(state.tokens[i, :3]).tolist(),
                           minlength=cfg.vocab_size)
    np.testing.assert_array_equal(np.asarray(state.counts[i]), expected)


def test_eos_inside_a_student_step_stops_the_row_there(small_cfg):
  # k = 3: an eos in slot 1 of a step keeps it, pads slots after it, and
  # the row's length counts up to it.
  cfg = dataclasses.replace(small_cfg, noise_window=4)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(13))
  noise = np.asarray(jax.random.uniform(jax.random.PRNGKey(14), (2, 12)))
  kw = dict(max_new_tokens=12, k=3, noise=noise)
  free = decode.generate(params, cfg, [[5, 9, 2], [1, 2]], **kw)
  row = free.tokens[0].tolist()
  # A token first emitted in the middle slot of some step of row 0.
  pos = next(i for i, t in enumerate(row) if i % 3 == 1 and t not in row[:i])
  eos = row[pos]
  out = decode.generate(params, cfg, [[5, 9, 2], [1, 2]], eos_id=eos,
                        pad_id=-1, **kw)
  assert out.lengths[0] == pos + 1
  np.testing.assert_array_equal(out.tokens[0, :pos + 1], row[:pos + 1])
  assert (out.tokens[0, pos + 1:] == -1).all()
  other = free.tokens[1].tolist()
  stop = other.index(eos) + 1 if eos in other else 12
  assert out.lengths[1] == stop
  np.testing.assert_array_equal(out.tokens[1, :stop], other[:stop])


@pytest.mark.parametrize('k', [1, 2])
def test_a_single_step_decode_fits_its_cache(small_cfg, k):
  # num_steps == 1: the cache holds the prefill only (P + k slots), and the
  # loop must not trace a decode step that would not fit.
  cfg = dataclasses.replace(small_cfg, noise_window=4 if k > 1 else 0)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  noise = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (2, k)))
  out = decode.generate(params, cfg, [[4], [7]], max_new_tokens=k, k=k,
                        noise=noise)
  longer = decode.generate(params, cfg, [[4], [7]], max_new_tokens=3 * k, k=k,
                           noise=np.pad(noise, ((0, 0), (0, 2 * k)),
                                        constant_values=0.5))
  np.testing.assert_array_equal(out.tokens, longer.tokens[:, :k])


def test_decoding_runs_under_x64_with_the_same_student_tokens():
  # distill.precision='float64' needs jax_enable_x64; decoding in such a
  # process used to fail (an int64 literal next to int32 step indices).
  # The student's argmax tokens do not depend on the flag; the teacher's
  # inverse CDF runs in float64 there, so only its greedy tokens must
  # match.
  cfg = model_lib.ModelConfig(vocab_size=37, seq_len=64, num_layers=2,
                              d_model=32, num_heads=4, mlp_dim=64,
                              noise_window=4)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(1))
  noise = np.asarray(jax.random.uniform(jax.random.PRNGKey(2), (2, 7)))
  kwargs = dict(max_new_tokens=7, k=3, noise=noise, frequency_penalty=0.3,
                eos_id=5)
  plain = decode.generate(params, cfg, [[3, 5, 7], [2]], **kwargs)
  # Noise drawn from an rng is float32 under x64 too: a seed gives the
  # same tokens either way (it drew float64 values, other tokens).
  seeded = dict(max_new_tokens=12, k=4, rng=jax.random.PRNGKey(3))
  plain_seeded = decode.generate(params, cfg, [[3, 5, 7], [2]], **seeded)
  teacher_cfg = dataclasses.replace(cfg, noise_window=0)
  with jax.enable_x64(True):
    wide = decode.generate(params, cfg, [[3, 5, 7], [2]], **kwargs)
    np.testing.assert_array_equal(
        decode.generate(params, cfg, [[3, 5, 7], [2]], **seeded).tokens,
        plain_seeded.tokens)
    teacher = model_lib.init_params(teacher_cfg, jax.random.PRNGKey(1))
    ar = decode.generate(teacher, teacher_cfg, [[3, 5, 7], [2]],
                         max_new_tokens=7, noise=noise)
    ar_greedy = decode.generate(teacher, teacher_cfg, [[3, 5, 7], [2]],
                                max_new_tokens=7, greedy=True)
  np.testing.assert_array_equal(wide.tokens, plain.tokens)
  np.testing.assert_array_equal(wide.lengths, plain.lengths)
  assert ar.tokens.shape == (2, 7)
  assert ((ar.tokens >= 0) & (ar.tokens < cfg.vocab_size)).all()
  np.testing.assert_array_equal(
      ar_greedy.tokens,
      decode.generate(teacher, teacher_cfg, [[3, 5, 7], [2]],
                      max_new_tokens=7, greedy=True).tokens)


def test_forward_never_reads_the_padding_ids(teacher):
  # An id outside the vocabulary embeds as NaN; padded slots must not read
  # it (prefill already masks them; the raw forward must too).
  cfg, params = teacher
  spec = decode.DecodeSpec(model=cfg, k=1, num_steps=1, prompt_len=3)
  logits = {}
  for pad_id in (0, 1000, cfg.vocab_size):
    prompts, pad = decode.pad_prompts([[1, 2, 3], [5]], pad_id=pad_id)
    logits[pad_id], _ = decode.forward(
        spec, params, jnp.asarray(prompts), None, decode.init_cache(spec, 2),
        0, jnp.asarray(pad))
  assert np.isfinite(np.asarray(logits[1000])).all()
  np.testing.assert_array_equal(logits[1000], logits[0])
  np.testing.assert_array_equal(logits[cfg.vocab_size], logits[0])


def test_decode_step_refuses_a_state_of_another_spec(small_cfg):
  # A k=4 state stepped under a k=2 spec used to overwrite earlier tokens
  # and advance lengths by 4, without an error.
  cfg = dataclasses.replace(small_cfg, noise_window=4)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  prompts, pad = decode.pad_prompts([[4, 5, 6]])
  spec4 = decode.DecodeSpec(model=cfg, k=4, num_steps=3, prompt_len=3)
  state = decode.prefill(spec4, params, prompts, pad, jnp.full((1, 4), 0.3))
  u = jnp.full((1, 4), 0.3)
  spec2 = dataclasses.replace(spec4, k=2)
  with pytest.raises(ValueError, match=r'state.pending has shape \(1, 4\); '
                     r'expected \(1, 2\)'):
    decode.decode_step(spec2, params, state, u[:, :2])
  with pytest.raises(ValueError, match=r'state.tokens has shape \(1, 12\); '
                     r'expected \(1, 16\)'):
    decode.decode_step(dataclasses.replace(spec4, num_steps=4), params,
                       state, u)
  with pytest.raises(ValueError, match='use_penalty=True but the state'):
    decode.decode_step(dataclasses.replace(spec4, use_penalty=True), params,
                       state, u)
  other = 'k' if decode.key_layout(spec4) == 'kt' else 'kt'
  with pytest.raises(ValueError, match=f"keys '{other}' and 'v'"):
    decode.decode_step(dataclasses.replace(spec4, key_layout=other), params,
                       state, u)
  wrapped = {'params': params}
  with pytest.raises(ValueError, match=r"pass params\['params'\]"):
    decode.decode_step(spec4, wrapped, state, u)
  # The spec that made the state still steps it.
  decode.decode_step(spec4, params, state, u)


@pytest.mark.parametrize('kwargs, needle', [
    (dict(prompts='hello'), "not text: got 'hello'"),
    (dict(prompts=[[1]], pad_id=2**40), 'pad_id=1099511627776'),
    (dict(prompts=[[1]], pad_id=1.0), 'pad_id must be an int'),
])
def test_pad_prompts_refuses_text_and_bad_pad_ids(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    decode.pad_prompts(**kwargs)


def test_students_refuse_a_nonsense_temperature(small_cfg):
  # Argmax students ignore the temperature, but -5 is a caller's mistake;
  # a sampled student's 0 is pointed to the argmax readout, not to greedy
  # (which a sampled readout refuses).
  cfg = dataclasses.replace(small_cfg, noise_window=2)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match='temperature=-5.0'):
    decode.generate(params, cfg, [[1]], max_new_tokens=2, k=2,
                    temperature=-5.0)
  with pytest.raises(ValueError, match=r"temperature=0.0 must be finite .*"
                     r"\(readout='argmax' for argmax\)"):
    decode.generate(params, cfg, [[1]], max_new_tokens=2, k=2,
                    temperature=0.0, readout='sample')
  spec = decode.DecodeSpec(model=cfg, k=2, num_steps=1, prompt_len=1,
                           readout='sample')
  with pytest.raises(ValueError, match="readout='argmax' in the DecodeSpec"):
    decode.check_values(spec, temperature=np.float32(0))


def test_the_readme_decoder_snippet_runs_as_written(small_cfg, monkeypatch):
  # The README's "Using the decoder from other JAX code" block, verbatim,
  # with load_params handing back a random student of window 4.
  path = os.path.join(os.path.dirname(__file__), '..', 'README.md')
  with open(path) as f:
    text = f.read()
  section = text[text.index('## Using the decoder from other JAX code'):]
  start = section.index('```python\n') + len('```python\n')
  code = section[start:section.index('\n```', start)]
  cfg = dataclasses.replace(small_cfg, vocab_size=128, noise_window=4)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  monkeypatch.setattr(kforcing_jax, 'load_params',
                      lambda path: (cfg, params, {}))
  scope = {}
  exec(compile(code, 'README.md', 'exec'), scope)  # pylint: disable=exec-used
  out = scope['out']
  assert out.tokens.shape == (2, 32) and out.lengths.tolist() == [32, 32]
  assert ((0 <= out.tokens) & (out.tokens < cfg.vocab_size)).all()

