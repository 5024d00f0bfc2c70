"""Kernels wired end to end: every projection impl gives the same tokens."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kforcing_jax import decode
from kforcing_jax import distill
from kforcing_jax import model as model_lib
from kforcing_jax import noise as noise_lib
from kforcing_jax import projection


@pytest.mark.parametrize('impl', ['chunked', 'pallas'])
def test_student_decoding_tokens_identical_across_impls(small_cfg, impl):
  cfg = dataclasses.replace(small_cfg, noise_window=2)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  prompts = [[3, 4, 5], [9, 1]]
  noise = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (2, 8)))
  kw = dict(max_new_tokens=8, k=2, noise=noise, frequency_penalty=0.3)
  ref = decode.generate(params, cfg, prompts, kernel_impl='reference', **kw)
  got = decode.generate(params, cfg, prompts, kernel_impl=impl, **kw)
  np.testing.assert_array_equal(got.tokens, ref.tokens)


@pytest.mark.parametrize('impl', ['chunked', 'pallas'])
def test_teacher_greedy_identical_across_impls_sampling_never_in_float32(
    small_cfg, impl, monkeypatch):
  # Greedy goes through each impl's argmax. Sampling keeps noise.py's
  # high-precision inverse CDF whatever the impl: the float32 kernel is
  # only for an explicit distill.precision='float32', so it must not run.
  params = model_lib.init_params(small_cfg, jax.random.PRNGKey(0))
  noise = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (2, 6)))
  for greedy in (True, False):
    kw = dict(max_new_tokens=6, noise=noise, greedy=greedy)
    ref = decode.generate(params, small_cfg, [[1, 2], [7]],
                          kernel_impl='reference', **kw)
    if not greedy:
      monkeypatch.setattr(projection.kernels, 'projected_inverse_cdf',
                          _must_not_run)
      decode.decode_loop.clear_cache()  # Traced anew, with the spy.
    got = decode.generate(params, small_cfg, [[1, 2], [7]], kernel_impl=impl,
                          **kw)
    np.testing.assert_array_equal(got.tokens, ref.tokens)


def _must_not_run(*args, **kwargs):
  raise AssertionError('the float32 inverse-CDF kernel ran')


def test_fused_distillation_loss_equals_reference(small_cfg):
  teacher = model_lib.init_params(small_cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 61)
  results = {}
  for impl in ('reference', 'chunked'):
    stage = distill.Stage(window=1, method='self_forcing',
                          student_cfg=distill.student_config(small_cfg, 1),
                          source_cfg=small_cfg, num_windows=4,
                          kernel_impl=impl)
    student, _, _ = distill.transfer_params(
        teacher, model_lib.init_params(stage.student_cfg,
                                       jax.random.PRNGKey(2)))
    extras = stage.extras(jax.random.PRNGKey(3), tokens, teacher)
    # Jitted: run op by op, this test took 55 s of a full run.
    loss_and_grad = jax.jit(jax.value_and_grad(stage.loss, has_aux=True))
    (loss, metrics), grads = loss_and_grad(student, tokens, extras,
                                           jax.random.PRNGKey(4), teacher)
    results[impl] = (extras['targets'], loss, metrics, grads)
  ref, got = results['reference'], results['chunked']
  np.testing.assert_array_equal(ref[0], got[0])
  np.testing.assert_allclose(ref[1], got[1], rtol=1e-5)
  assert ref[2]['acc_slot1'] == got[2]['acc_slot1']
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               ref[3], got[3])


def test_unknown_impl_is_named():
  with pytest.raises(ValueError, match="kernels.impl='fast'"):
    projection.check_impl('fast')


def test_first_argmax_equals_argmax_with_ties():
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 300))
  # Exact ties between two columns in some rows, and an all-equal row.
  x = x.at[::3, 7].set(jnp.max(x[::3], axis=1) + 1.0)
  x = x.at[::3, 200].set(x[::3, 7])
  x = x.at[5].set(0.25)
  got = projection.first_argmax(x)
  np.testing.assert_array_equal(got, jnp.argmax(x, axis=-1))
  assert int(got[0]) == 7 and int(got[5]) == 0
  nan_row = projection.first_argmax(jnp.array([[1.0, jnp.nan, 3.0]]))
  assert 0 <= int(nan_row[0]) < 3  # Never an out-of-range token id.


@pytest.mark.parametrize('impl', ['reference', 'chunked', 'pallas'])
def test_penalty_counts_frequency_not_presence(impl):
  # Hand-made logits (h = logits, w = identity): token 0 leads token 1 by
  # 0.2, has been seen twice, token 1 never. lambda = 0.15 subtracts 0.3
  # from token 0 (frequency: token 1 wins); a presence penalty would
  # subtract 0.15 (token 0 would win). Every impl must count.
  v = 8
  h = jnp.asarray([[1.0, 0.8, 0.1, 0.0, -1.0, 0.2, 0.3, -0.5]], jnp.float32)
  w = jnp.eye(v, dtype=jnp.float32)
  counts = jnp.asarray([[2, 0, 0, 0, 0, 0, 0, 0]], jnp.int32)
  got = projection.argmax(h, w, impl, counts, 0.15)
  assert int(got[0]) == 1
  once = projection.argmax(h, w, impl, counts // 2, 0.15)  # Seen once.
  assert int(once[0]) == 0


@pytest.mark.parametrize('greedy', [True, False])
def test_teacher_penalty_equals_stepwise_reference(small_cfg, greedy):
  # The AR teacher with a frequency penalty: each token is the argmax (or
  # inverse CDF of its u) of the full forward's logits minus lambda * counts
  # of the prompt and every token so far.
  params = model_lib.init_params(small_cfg, jax.random.PRNGKey(2))
  prompt, n, lam = [5, 9, 2, 9], 10, 0.2
  noise = np.asarray(jax.random.uniform(jax.random.PRNGKey(3), (1, n)))
  got = decode.generate(params, small_cfg, [prompt], max_new_tokens=n,
                        noise=noise, greedy=greedy, frequency_penalty=lam,
                        kernel_impl='reference').tokens[0]
  seq = list(prompt)
  # One compiled forward over a fixed width (the model is causal, so the
  # zeros after the sequence change nothing); eager, each new length cost
  # seconds of op-by-op compiles.
  forward = jax.jit(model_lib.Transformer(small_cfg).apply)
  for i in range(n):
    padded = jnp.asarray([seq + [0] * (len(prompt) + n - len(seq))])
    lg = forward({'params': params}, padded)[0, len(seq) - 1]
    lg = lg - lam * jnp.bincount(jnp.asarray(seq), length=small_cfg.vocab_size)
    if greedy:
      tok = int(projection.first_argmax(lg[None])[0])
    else:
      tok = int(noise_lib.inverse_cdf(lg[None], jnp.asarray(noise[:, i]))[0])
    seq.append(tok)
  np.testing.assert_array_equal(got, seq[len(prompt):])
  plain = decode.generate(params, small_cfg, [prompt], max_new_tokens=n,
                          noise=noise, greedy=greedy).tokens[0]
  assert not np.array_equal(plain, got)  # Else lambda checks nothing.


def test_only_an_explicit_float32_request_samples_with_the_pallas_kernel(
    monkeypatch):
  # docs/METHOD.md asks for a high-precision coupling: on TPU ('pallas')
  # the default 'auto' keeps noise.py's exact path; the plain-f32 kernel
  # runs only when asked for by name.
  rng = np.random.default_rng(1)
  h = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, 50)), jnp.float32)
  u = jnp.asarray(rng.uniform(size=4), jnp.float32)
  calls = []
  real = projection.kernels.projected_inverse_cdf

  def spy(*args, **kwargs):
    calls.append(kwargs.get('impl'))
    return real(*args, **kwargs)

  monkeypatch.setattr(projection.kernels, 'projected_inverse_cdf', spy)
  want = noise_lib.inverse_cdf(projection.logits(h, w), u)
  got = projection.inverse_cdf(h, w, u, 'pallas')
  np.testing.assert_array_equal(got, want)
  assert not calls
  projection.inverse_cdf(h, w, u, 'pallas', precision='float32')
  assert calls == ['pallas']


def test_pallas_inverse_cdf_honours_the_asked_precision():
  # The Pallas kernel is float32: a float64 request must take the float64
  # path (stage-1 targets with distill.precision='float64' on TPU), and a
  # bad value must be refused, not ignored.
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(6, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 300)) * 3, jnp.float32)
  u = jnp.asarray(rng.uniform(size=6), jnp.float32)
  with pytest.raises(ValueError, match="precision must be one of"):
    projection.inverse_cdf(h, w, u, 'pallas', precision='bogus')
  with pytest.raises(ValueError, match='jax_enable_x64'):
    projection.inverse_cdf(h, w, u, 'pallas', precision='float64')
  with jax.enable_x64(True):
    lg = projection.logits(h, w)
    want = noise_lib.inverse_cdf(lg, u, precision='float64')
    for precision in ('float64', 'auto'):
      got = projection.inverse_cdf(h, w, u, 'pallas', precision=precision)
      np.testing.assert_array_equal(got, want)
