"""AR decoding: jitted loop == full forward, padding, eos, noise coupling."""


import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kforcing_jax import decode
from kforcing_jax import model as model_lib
from kforcing_jax import noise as noise_lib


@pytest.fixture
def teacher(small_cfg):
  return small_cfg, model_lib.init_params(small_cfg, jax.random.PRNGKey(0))


def _full_logits(cfg, params, seq):
  return model_lib.Transformer(cfg).apply({'params': params},
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
     '1.0'),
    (dict(prompts=[[1]], max_new_tokens=2, noise=np.zeros((1, 3))),
     'noise shape'),
    (dict(prompts=[[1]], max_new_tokens=2, temperature=0.0), 'temperature=0'),
])
def test_bad_requests_fail_before_compute(teacher, kwargs, needle):
  cfg, params = teacher
  with pytest.raises(ValueError, match=needle):
    decode.generate(params, cfg, **kwargs)


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


@pytest.mark.parametrize('impl', ['reference', 'chunked'])
def test_student_penalty_is_applied_slot_by_slot(small_cfg, impl):
  # Reference: one uncached pass over [context | k noise slots] per step,
  # then the penalised argmax slot by slot, counting the prompt and every
  # earlier token (earlier slots of the same step included).
  cfg = dataclasses.replace(small_cfg, noise_window=4)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(3))
  k, steps, penalty = 4, 3, 0.7
  prompt = [5, 9, 2, 33, 7]
  noise = np.asarray(jax.random.uniform(jax.random.PRNGKey(4),
                                        (1, k * steps)), np.float32)
  got = decode.generate(params, cfg, [prompt], max_new_tokens=k * steps, k=k,
                        noise=noise, frequency_penalty=penalty,
                        kernel_impl=impl).tokens[0]
  seq = list(prompt)
  counts = np.bincount(prompt, minlength=cfg.vocab_size).astype(np.float64)
  for step in range(steps):
    spec = decode.DecodeSpec(model=cfg, k=k, num_steps=1, prompt_len=len(seq))
    logits, _ = decode.forward(
        spec, params, jnp.asarray([seq]),
        jnp.asarray(noise[:, step * k:(step + 1) * k]),
        decode.init_cache(spec, 1), 0, jnp.zeros((1,), jnp.int32))
    for i in range(k):
      tok = int(np.argmax(np.asarray(logits[0, i], np.float64)
                          - penalty * counts))
      counts[tok] += 1
      seq.append(tok)
  np.testing.assert_array_equal(got, seq[len(prompt):])
  # The penalty must matter here, or this test checks nothing.
  plain = decode.generate(params, cfg, [prompt], max_new_tokens=k * steps,
                          k=k, noise=noise).tokens[0]
  assert not np.array_equal(plain, got)


def _decode_variants(small_cfg, k, variants, seed):
  """[(spec, decode_loop output)] of one model, prompts and noise, for each
  dict of DecodeSpec overrides in `variants`."""
  cfg = dataclasses.replace(small_cfg, noise_window=4 if k > 1 else 0)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(seed))
  prompts, pad = decode.pad_prompts([[5, 9, 2, 33, 7], [1, 2]])
  steps = 24 // k
  noise = jax.random.uniform(jax.random.PRNGKey(seed + 1), (2, steps * k))
  outs = []
  for overrides in variants:
    spec = decode.DecodeSpec(model=cfg, k=k, num_steps=steps,
                             prompt_len=prompts.shape[1], use_penalty=True,
                             **overrides)
    outs.append((spec, decode.decode_loop(
        spec, params, jnp.asarray(prompts), jnp.asarray(pad), noise,
        jnp.float32(1.0), jnp.float32(0.3))))
  return outs


@pytest.mark.parametrize('k', [1, 3])
def test_growing_cache_equals_full_size_cache(small_cfg, k):
  # The loop's cache grows in blocks (DecodeSpec.cache_block); attention
  # over a smaller cache must give the same tokens as over the full one.
  (_, full), (grown_spec, grown) = _decode_variants(
      small_cfg, k, [{'cache_block': 0}, {'cache_block': 4}], seed=5)
  assert len(grown_spec.segments()) > 2  # The test must cross segments.
  np.testing.assert_array_equal(full[0], grown[0])
  np.testing.assert_array_equal(full[1], grown[1])


@pytest.mark.parametrize('k', [1, 3])
def test_key_layouts_give_the_same_tokens(small_cfg, k):
  # DecodeSpec.key_layout only changes how keys are stored; 'auto' picks
  # 'k' for AR and 'kt' for push-forward, so each k checks the other one.
  (k_spec, k_out), (kt_spec, kt_out) = _decode_variants(
      small_cfg, k, [{'key_layout': 'k'}, {'key_layout': 'kt'}], seed=7)
  assert 'k' in decode.init_cache(k_spec, 2, 8)[0]
  assert 'kt' in decode.init_cache(kt_spec, 2, 8)[0]
  np.testing.assert_array_equal(k_out[0], kt_out[0])
  np.testing.assert_array_equal(k_out[1], kt_out[1])
  bad = dataclasses.replace(k_spec, key_layout='bshk')
  with pytest.raises(ValueError, match="key_layout='bshk'"):
    decode.init_cache(bad, 2)
