"""Tests for kforcing_jax.noise: inverse CDF, noise inversion, noise encoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kforcing_jax import noise

F32_ONE_MINUS = np.nextafter(np.float32(1), np.float32(0))


@pytest.fixture
def x64():
  """Enables 64-bit JAX inside one test only (restored on exit)."""
  with jax.enable_x64(True):
    yield


def _ref_inverse_cdf(logits_RxV, u_RxS, temperature=1.0):
  """Independent numpy float64 reference: smallest v with q(v)>0, F(v)>=u."""
  l = np.asarray(logits_RxV, np.float64) / temperature
  q = np.exp(l - l.max(-1, keepdims=True))
  out = np.empty(u_RxS.shape, np.int64)
  for r in range(q.shape[0]):
    cdf = np.cumsum(q[r])
    pos = np.nonzero(q[r] > 0)[0]
    # searchsorted over positive-mass tokens only: zero-mass ids are skipped.
    k = np.searchsorted(cdf[pos], u_RxS[r].astype(np.float64) * cdf[-1])
    out[r] = pos[np.minimum(k, len(pos) - 1)]
  return out


def test_float32_path_matches_float64_reference():
  # 16 (V, scale) cases x 2 rows x 6400 u = 204,800 draws, bound 1e-4.
  # The float32 path keeps its CDF exact to ~1e-12 of the total mass
  # (double-word sums), so what remains is float32 rounding of exp(l - max)
  # (~1e-7 relative per token), which moves boundaries by ~1e-10..1e-8 of
  # the mass: measured ~6e-6 of draws disagree (about 1 of these 204,800).
  # A float32 jnp.cumsum + compare (even unnormalised) disagrees on ~6e-4,
  # a sequential float32 cumsum on 3-12% at V=50257: the bound has 15x room
  # for noise yet fails for a naive implementation.
  rng = np.random.default_rng(0)
  rows, draws = 2, 6400
  bad = total = 0
  for vocab in (50257, 30522, 4096, 7):
    for scale in (0.1, 1.0, 3.0, 10.0):  # Flat ... peaked.
      logits = (rng.normal(size=(rows, vocab)) * scale).astype(np.float32)
      u = rng.random((rows, draws), dtype=np.float32)
      got = np.asarray(noise.inverse_cdf(logits[:, None, :], u,
                                         precision='float32'))
      ref = _ref_inverse_cdf(logits, u)
      bad += int((got != ref).sum())
      total += got.size
  assert total >= 200_000
  assert bad / total <= 1e-4, (bad, total)


def test_float64_path_matches_reference(x64):
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 30522)) * 2.0
  u = rng.random((2, 4000))
  got = np.asarray(noise.inverse_cdf(logits[:, None, :], u,
                                     precision='float64'))
  np.testing.assert_array_equal(got, _ref_inverse_cdf(logits, u))


def test_empirical_frequencies_match_probabilities():
  probs = np.array([0.05, 0.1, 0.15, 0.2, 0.2, 0.3])
  logits = np.log(probs).astype(np.float32)
  n = 200_000
  u = np.random.default_rng(1234).random(n, dtype=np.float32)
  tokens = np.asarray(noise.inverse_cdf(logits, u, precision='float32'))
  assert tokens.shape == (n,)
  counts = np.bincount(tokens, minlength=6)
  expected = n * probs
  chi2 = np.sum((counts - expected) ** 2 / expected)
  # Upper 0.1% point of chi-square with 5 degrees of freedom (tabulated).
  assert chi2 < 20.515, (chi2, counts)
  sigma = np.sqrt(n * probs * (1 - probs))
  assert np.max(np.abs(counts - expected) / sigma) < 5


@pytest.mark.parametrize('precision', ['float32', 'float64'])
def test_edges(precision):
  with jax.enable_x64(precision == 'float64'):
    dt = np.float64 if precision == 'float64' else np.float32
    inf = np.inf
    one_minus = np.nextafter(dt(1), dt(0))
    after = lambda x: np.nextafter(dt(x), dt(1))
    logits = np.array([
        [-inf, -inf, 0.3, -inf, 1.0, 2.0, -inf],
        # Four equal logits: exact masses 1, 2, 3, 4 of Z = 4.
        [0.0, 0.0, 0.0, 0.0, -inf, -inf, -inf],
        [-inf] * 7,
    ], dt)
    u = np.array([
        # u = 0 gives the first positive-mass token (2, not 0); u -> 1 the
        # last one (5, never an id >= V), also for an out-of-range u = 1.
        [0.0, one_minus, 1.0, 0.0, 0.0, 0.0, 0.0],
        # u exactly on a step F(v) returns v (F(v) >= u); the next float
        # returns v + 1.
        [0.25, 0.5, 0.75, after(0.25), after(0.5), after(0.75), one_minus],
        [0.3] * 7,  # All -inf: documented to return 0.
    ], dt)
    want = [[2, 5, 5, 2, 2, 2, 2],
            [0, 1, 2, 1, 2, 3, 3],
            [0] * 7]
    got = noise.inverse_cdf(logits[:, None], u, precision=precision)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('precision', ['float32', 'float64'])
def test_zero_probability_tokens_never_returned(precision):
  with jax.enable_x64(precision == 'float64'):
    dt = np.float64 if precision == 'float64' else np.float32
    rng = np.random.default_rng(2)
    vocab = 300  # Three blocks of 128, the last one partial.
    logits = rng.normal(size=(4, vocab)).astype(dt) * 3
    logits[rng.random((4, vocab)) < 0.5] = -np.inf
    logits[0, :128] = -np.inf  # A block without any positive token.
    logits[0, 0] = 0.0
    logits[1, :] = -np.inf  # A single positive token, mid-vocabulary.
    logits[1, 200] = 1.0
    logits[2, -1] = -np.inf
    # Masses that underflow to exactly 0 in either precision.
    logits[3, ::7] = -1e4
    u = np.concatenate([
        rng.random(5000).astype(dt), np.array([0, F32_ONE_MINUS], dt),
        np.nextafter(dt(1), dt(0))[None],
        np.linspace(0, 1, 1001, endpoint=False).astype(dt)])
    tok = np.asarray(noise.inverse_cdf(logits[:, None, :], u[None, :],
                                       precision=precision))
    assert tok.shape == (4, u.size)
    assert np.all((tok >= 0) & (tok < vocab))
    chosen = np.take_along_axis(logits, tok, axis=1)
    assert np.all(chosen > -1e3)
    assert np.all(tok[1] == 200)
    # Zero-mass ids are skipped, so this matches the skipping reference.
    np.testing.assert_array_equal(tok, _ref_inverse_cdf(
        np.where(logits < -1e3, -np.inf, logits), np.tile(u, (4, 1))))


def test_temperature():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(8, 1, 500)).astype(np.float32)
  best = rng.integers(0, 500, 8)
  logits[np.arange(8), 0, best] = logits.max(-1)[:, 0] + 1  # Clear argmax.
  u = rng.uniform(1e-6, 1 - 1e-6, size=(8, 200)).astype(np.float32)
  plain = np.asarray(noise.inverse_cdf(logits, u))
  np.testing.assert_array_equal(
      noise.inverse_cdf(logits, u, temperature=1.0), plain)
  cold = noise.inverse_cdf(logits, u, temperature=0.01)
  np.testing.assert_array_equal(cold, np.broadcast_to(best[:, None], (8, 200)))
  # Temperature per row, against the reference.
  temps = np.array([2.0, 2.0, 2.0, 2.0, 0.5, 0.5, 0.5, 0.5], np.float32)
  mixed = np.asarray(noise.inverse_cdf(logits, u, temperature=temps[:, None]))
  ref = np.concatenate([_ref_inverse_cdf(logits[:4, 0], u[:4], 2.0),
                        _ref_inverse_cdf(logits[4:, 0], u[4:], 0.5)])
  assert np.mean(mixed != ref) <= 1e-3
  assert np.mean(mixed != plain) > 0.1  # Temperature does something.
  # A traced temperature works under jit (the decode loop does this).
  traced = jax.jit(lambda l, u, t: noise.inverse_cdf(l, u, temperature=t))
  np.testing.assert_array_equal(traced(logits, u, temps[:, None]), mixed)
  for bad in (0.0, -1.0, np.array([1.0, 0.0])):
    with pytest.raises(ValueError, match='temperature'):
      noise.inverse_cdf(logits, u, temperature=bad)


def test_precision_argument():
  logits = jnp.zeros((2, 10))
  with pytest.raises(ValueError, match='jax_enable_x64'):
    noise.inverse_cdf(logits, jnp.zeros(2), precision='float64')
  with pytest.raises(ValueError, match='jax_enable_x64'):
    noise.uniform_interval(logits, jnp.zeros(2, jnp.int32),
                           precision='float64')
  with pytest.raises(ValueError, match='precision'):
    noise.inverse_cdf(logits, jnp.zeros(2), precision='float16')
  # bfloat16 logits are accepted and give int32 ids.
  out = noise.inverse_cdf(logits.astype(jnp.bfloat16), jnp.full(2, 0.55))
  assert out.dtype == jnp.int32
  np.testing.assert_array_equal(out, [5, 5])


def test_uniform_interval_and_sample_u_round_trip():
  rng = np.random.default_rng(5)
  vocab = 1000
  logits = (rng.normal(size=(5, 1, vocab)) * 3).astype(np.float32)
  logits[:3, 0, 5] = -np.inf
  # Tiny masses (~1e-13 of the max) where float32 u can still resolve them.
  logits[:3, 0, :5] = logits.max() - 30
  logits[3] /= 3  # A flat row: every id is wide enough to hold a float32.
  # Row 4: a token one or two float32 ulps wide at u ~ 0.5, so that the
  # plain lo + w * (hi - lo) usually rounds outside and the repair must act.
  logits[4] = -np.inf
  logits[4, 0, :3] = np.log(np.array([1.0, 2.0 ** -23, 1.0], np.float32))

  lo, hi = noise.uniform_interval(logits, np.arange(vocab))
  lo, hi = np.asarray(lo), np.asarray(hi)
  q = np.exp(logits[:, 0].astype(np.float64) -
             logits[:, 0].max(-1, keepdims=True))
  cdf = np.cumsum(q, -1) / q.sum(-1, keepdims=True)
  np.testing.assert_allclose(hi, cdf, rtol=0, atol=1e-6)
  np.testing.assert_allclose(lo[:, 1:], cdf[:, :-1], rtol=0, atol=1e-6)
  assert np.all(lo[:, 0] == 0) and np.all(hi >= lo)
  assert np.all(lo[:3, 5] == hi[:3, 5])  # Zero mass: empty interval.

  # Tokens: drawn from the model (so reachable) plus the tiny ids 0..4
  # (rows 0-2), every id (row 3), the narrow token 1 (row 4).
  tokens = np.array(noise.inverse_cdf(
      logits, rng.random((5, vocab), dtype=np.float32)))
  tokens[:3, :5] = np.arange(5)
  tokens[3] = np.arange(vocab)
  tokens[4] = 1
  u = noise.sample_u_in_interval(jax.random.PRNGKey(0), logits, tokens)
  np.testing.assert_array_equal(noise.inverse_cdf(logits, u), tokens)
  u = np.asarray(u)
  assert u.dtype == np.float32 and np.all((u >= 0) & (u < 1))
  lo_t = np.take_along_axis(lo, tokens, 1)
  hi_t = np.take_along_axis(hi, tokens, 1)
  slack = 4 * np.spacing(np.float32(1))
  assert np.all((u >= lo_t - slack) & (u <= hi_t + slack))
  # Inside wide intervals u is spread out, not pinned to an end.
  w = (u[3] - lo_t[3]) / (hi_t[3] - lo_t[3])
  assert 0.4 < w.mean() < 0.6 and w.min() < 0.05 and w.max() > 0.95


def test_sample_u_in_interval_round_trip_float64(x64):
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(2, 1, 3000)) * 4
  tokens = rng.integers(0, 3000, size=(2, 300))
  u = noise.sample_u_in_interval(jax.random.PRNGKey(3), logits, tokens,
                                 precision='float64')
  assert u.dtype == jnp.float64
  np.testing.assert_array_equal(
      noise.inverse_cdf(logits, u, precision='float64'), tokens)


def _np_features(x, dim, max_period=10000.0):
  half = dim // 2
  freqs = max_period ** (-np.arange(half) / half)
  ang = 2 * np.pi * np.asarray(x, np.float64)[..., None] * freqs
  return np.concatenate([np.cos(ang), np.sin(ang)], -1)


def test_sinusoidal_features():
  x = np.random.default_rng(7).random((3, 5)).astype(np.float32)
  f = noise.sinusoidal_features(x, 16)
  assert f.shape == (3, 5, 16) and f.dtype == jnp.float32
  assert np.all(np.isfinite(f))
  np.testing.assert_allclose(f, _np_features(x, 16), atol=1e-6)
  # Large arguments: the mod-1 reduction keeps float32 close to float64
  # (a naive float32 2*pi*x*f is off by ~1e-3 at x = 3000).
  big = np.array([0.999, 123.456, 3000.5, 9876.54321], np.float32)
  np.testing.assert_allclose(noise.sinusoidal_features(big, 64),
                             _np_features(big, 64), atol=2e-6)
  # Small differences near 1 are resolved.
  for base in (0.999, float(F32_ONE_MINUS) - 2e-6):
    a = noise.sinusoidal_features(np.float32(base), 256)
    b = noise.sinusoidal_features(np.float32(base + 1e-6), 256)
    assert float(jnp.max(jnp.abs(a - b))) > 2e-6
  with pytest.raises(ValueError, match='even'):
    noise.sinusoidal_features(x, 7)


def test_sinusoidal_features_float64(x64):
  x = np.random.default_rng(8).random(50) * 100
  np.testing.assert_allclose(noise.sinusoidal_features(x, 32),
                             _np_features(x, 32), atol=1e-7)


def test_noise_encoder():
  enc = noise.NoiseEncoder(d_model=16, feature_dim=8)
  u = jnp.array([[0.1, 0.5, 0.9], [0.0, 0.5, 0.5 + 1e-6]], jnp.float32)
  params = jax.jit(enc.init)(jax.random.PRNGKey(0), u)
  n_params = sum(p.size for p in jax.tree.leaves(params))
  assert n_params == noise.noise_encoder_num_params(16, 8)
  apply = jax.jit(enc.apply)
  out = apply(params, u)
  assert out.shape == (2, 3, 16) and out.dtype == jnp.float32
  # Same u, same output; different u, different output, even 1e-6 apart.
  np.testing.assert_array_equal(out[0, 1], out[1, 1])
  assert float(jnp.max(jnp.abs(out[0] - out[1]))) > 1e-3
  assert float(jnp.max(jnp.abs(out[1, 1] - out[1, 2]))) > 0
  # tau defaults to 1.0 and matters.
  np.testing.assert_allclose(apply(params, u, jnp.ones((2, 3))), out,
                             atol=1e-6)
  assert not np.allclose(apply(params, u, jnp.full((2, 3), 0.7)), out)
  # bfloat16 compute, explicit mlp_dim.
  enc16 = noise.NoiseEncoder(d_model=16, feature_dim=8, mlp_dim=40,
                             dtype=jnp.bfloat16)
  p16 = jax.eval_shape(enc16.init, jax.random.PRNGKey(1), u)
  assert (sum(p.size for p in jax.tree.leaves(p16)) ==
          noise.noise_encoder_num_params(16, 8, 40))
  p16 = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), p16)
  assert jax.jit(enc16.apply)(p16, u).dtype == jnp.bfloat16


def test_noise_encoder_paper_size():
  # Width 768 with 768 features per input and a 4x MLP is the paper's ~5.9M.
  enc = noise.NoiseEncoder(d_model=768, feature_dim=768, mlp_dim=3072)
  shapes = jax.eval_shape(enc.init, jax.random.PRNGKey(0), jnp.zeros((1,)))
  n_params = sum(p.size for p in jax.tree.leaves(shapes))
  assert n_params == noise.noise_encoder_num_params(768, 768, 3072) == 5904384


def test_check_noise():
  noise.check_noise(np.array([0.0, 0.5, F32_ONE_MINUS], np.float32))
  noise.check_noise(jnp.zeros((2, 3)))
  noise.check_noise(np.zeros((0,)))
  with pytest.raises(ValueError, match=r'u\[2\]=1\.0; min=0\.0, max=1\.0'):
    noise.check_noise(np.array([0.0, 0.5, 1.0]))
  with pytest.raises(ValueError, match=r'u\[1, 0\]=-0\.25; min=-0\.25'):
    noise.check_noise(np.array([[0.1, 0.2], [-0.25, 0.3]]))
  with pytest.raises(ValueError, match='nan'):
    noise.check_noise(np.array([0.1, np.nan]))
  with pytest.raises(ValueError, match='inf'):
    noise.check_noise(np.array([np.inf, 0.1]))
  with pytest.raises(TypeError, match='concrete'):
    jax.jit(noise.check_noise)(jnp.zeros(3))


def test_paper_configs_build_the_papers_noise_encoder():
  # docs/METHOD.md: about 5.9M parameters at width 768.
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from kforcing_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for name in ('lm1b', 'owt'):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(root, 'configs', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = model_lib.ModelConfig.from_config(module.get_config().model,
                                            noise_window=4)
    params = jax.eval_shape(lambda r, c=cfg: model_lib.init_params(c, r),
                            jax.random.PRNGKey(0))
    assert model_lib.count_params(params['noise_encoder']) == 5904384, name


def test_fine_uniform_is_the_exact_fraction_of_the_scaled_u():
  u = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (4096,)))
  u = np.concatenate([u, [0.0, 1 / 1024, np.nextafter(np.float32(1), 0)]])
  u = u.astype(np.float32)
  got = np.asarray(noise.fine_uniform(u))
  scaled = u.astype(np.float64) * noise.FINE_NOISE_SCALE
  np.testing.assert_array_equal(got, scaled - np.floor(scaled))
  assert got.min() >= 0 and got.max() < 1
  # Uniform and nearly independent of the coarse bits the student sees:
  # its mean in each of 4 coarse quarters of u is about 1/2.
  for q in range(4):
    part = got[(u >= q / 4) & (u < (q + 1) / 4)]
    assert abs(part.mean() - 0.5) < 0.03, (q, part.mean())


def test_readout_uniform_is_the_fine_bits_or_the_median():
  u = jax.random.uniform(jax.random.PRNGKey(1), (3, 5))
  np.testing.assert_array_equal(noise.readout_uniform('sample', u),
                                noise.fine_uniform(u))
  median = noise.readout_uniform('median', u)
  assert median.dtype == jnp.float32 and median.shape == (3, 5)
  np.testing.assert_array_equal(median, np.full((3, 5), 0.5, np.float32))
  with pytest.raises(ValueError, match="readout='argmax' has no uniform"):
    noise.readout_uniform('argmax', u)
