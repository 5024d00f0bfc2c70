"""Tests for kforcing_jax.kernels: Pallas (interpret mode) and chunked-XLA
variants against the plain-JAX references, plus the dispatchers.

Pallas runs with interpret=True on CPU, so every distinct shape / block
configuration costs a compile; the unmarked cases are a small fast subset and
the wider sweeps are marked slow.
"""

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from kforcing_jax import kernels
from kforcing_jax.kernels import _common
from kforcing_jax.kernels import projected_sampling

BLOCKWISE = ('pallas', 'chunked')
SLOW = pytest.mark.slow

F32, BF16 = jnp.float32, jnp.bfloat16
# (M, V, block_m, block_v for Pallas, chunk for chunked, h dtype, W dtype).
# Blocks rarely divide V, so padded vocab columns and padded rows are
# exercised; chunks 100 / 7 / 300 leave a partial trailing chunk.
FAST_CASES = [
    (3, 300, 8, 128, 100, F32, F32),
    (13, 1000, 8, 256, 256, BF16, BF16),
]
SLOW_CASES = [
    pytest.param(1, 37, 8, 128, 7, F32, F32, marks=SLOW),
    pytest.param(8, 128, 8, 128, 128, BF16, F32, marks=SLOW),
    pytest.param(13, 300, 16, 128, 64, F32, F32, marks=SLOW),
    pytest.param(1, 1000, 8, 512, 300, F32, BF16, marks=SLOW),
    pytest.param(8, 37, 8, 128, 37, BF16, BF16, marks=SLOW),
    pytest.param(3, 1000, None, None, None, F32, F32, marks=SLOW),
]
CASES = FAST_CASES + SLOW_CASES
CASE_ARGS = 'm,v,block_m,block_v,chunk,h_dtype,w_dtype'


def _blocks(impl, block_m, block_v, chunk):
  if impl == 'pallas':
    return dict(block_m=block_m, block_v=block_v)
  return dict(block_v=chunk)


def _random_hw(seed, m, v, d=32, h_dtype=jnp.float32, w_dtype=jnp.float32,
               scale=1.0):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(m, d)).astype(np.float32)
  w = (scale / np.sqrt(d)) * rng.normal(size=(d, v)).astype(np.float32)
  return jnp.asarray(h, h_dtype), jnp.asarray(w, w_dtype)


def _logits_f64(h, w):
  return np.asarray(h, np.float64) @ np.asarray(w, np.float64)


# ------------------------------------------------------------------ argmax --


@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_argmax_matches_reference(m, v, block_m, block_v, chunk, h_dtype,
                                  w_dtype):
  h, w = _random_hw(0, m, v, h_dtype=h_dtype, w_dtype=w_dtype)
  ref = kernels.projected_argmax(h, w, impl='reference')
  np.testing.assert_array_equal(ref, np.argmax(_logits_f64(h, w), axis=1))
  for impl in BLOCKWISE:
    got = kernels.projected_argmax(
        h, w, impl=impl, **_blocks(impl, block_m, block_v, chunk))
    assert got.dtype == jnp.int32 and got.shape == (m,)
    np.testing.assert_array_equal(got, ref, err_msg=impl)


def _tied_problem(dtype, v=300):
  """Rows whose maximum is attained by two identical columns.

  h is a scaled one-hot, so every logit is an exact small integer; row r's
  maximum 5 sits at columns (a_r, b_r) with a_r < b_r, chosen to put the tie
  inside a block, across the 128-column block boundary, and in the padded
  last block.
  """
  pairs = [(5, 133), (127, 128), (0, 299), (140, 141), (260, 299), (3, 4)]
  m = len(pairs)
  rng = np.random.default_rng(1)
  w = rng.integers(-3, 4, size=(m, v)).astype(np.float32)
  expected = []
  for r, (a, b) in enumerate(pairs):
    w[r, a] = w[r, b] = 5.0
    expected.append(a)
  h = 2.0 * np.eye(m, dtype=np.float32)
  return jnp.asarray(h, dtype), jnp.asarray(w, dtype), np.array(expected)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_argmax_ties_go_to_lowest_index(dtype):
  h, w, expected = _tied_problem(dtype)
  for impl, kw in [('reference', {}), ('pallas', dict(block_v=128)),
                   ('chunked', dict(block_v=128)), ('chunked', dict(
                       block_v=7))]:
    np.testing.assert_array_equal(
        kernels.projected_argmax(h, w, impl=impl, **kw), expected,
        err_msg=f'{impl} {kw}')


def test_argmax_all_neg_inf_row_gives_zero():
  h = jnp.ones((2, 1), jnp.float32)
  w = jnp.full((1, 200), -jnp.inf, jnp.float32)
  for impl in ('reference',) + BLOCKWISE:
    np.testing.assert_array_equal(
        kernels.projected_argmax(h, w, impl=impl, block_v=128), [0, 0])


@pytest.mark.parametrize('m,v,block_m,block_v,chunk', [
    (5, 300, 8, 128, 64),
    pytest.param(13, 1000, 16, 256, 300, marks=SLOW),
])
def test_argmax_frequency_penalty(m, v, block_m, block_v, chunk):
  h, w = _random_hw(2, m, v, scale=4.0)
  logits = _logits_f64(h, w)
  order = np.argsort(-logits, axis=1)
  best, second = order[:, 0], order[:, 1]
  gap = logits[np.arange(m), best] - logits[np.arange(m), second]
  # Penalise the winner once: with a penalty above the gap, the runner-up
  # wins; every other token has count 0 (or 3 for a far-away loser).
  counts = np.zeros((m, v), np.int32)
  counts[np.arange(m), best] = 1
  counts[np.arange(m), order[:, -1]] = 3
  counts = jnp.asarray(counts)
  penalty = float(gap.max()) + 1.0
  for impl in ('reference',) + BLOCKWISE:
    kw = {} if impl == 'reference' else _blocks(impl, block_m, block_v, chunk)
    unpenalised = kernels.projected_argmax(
        h, w, counts_MxV=counts, penalty=0.0, impl=impl, **kw)
    np.testing.assert_array_equal(unpenalised, best, err_msg=impl)
    penalised = kernels.projected_argmax(
        h, w, counts_MxV=counts, penalty=penalty, impl=impl, **kw)
    np.testing.assert_array_equal(penalised, second, err_msg=impl)


# ------------------------------------------------------------- inverse CDF --


def _cdf_f64(h, w, temperature):
  z = _logits_f64(h, w) / temperature
  e = np.exp(z - z.max(axis=1, keepdims=True))
  cdf = np.cumsum(e, axis=1)
  return cdf / cdf[:, -1:]


def _uniforms_off_steps(seed, cdf, rel_gap=1e-4):
  """u in [0, 1) at least rel_gap away from every CDF step.

  Near a step, float summation order legitimately decides the token, so
  exact cross-implementation equality is only claimed away from steps.
  """
  rng = np.random.default_rng(seed)
  u = rng.uniform(size=cdf.shape[0])
  for r in range(cdf.shape[0]):
    while np.min(np.abs(cdf[r] - u[r])) < rel_gap:
      u[r] = rng.uniform()
  return jnp.asarray(u, jnp.float32)


@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_inverse_cdf_matches_reference(m, v, block_m, block_v, chunk, h_dtype,
                                       w_dtype):
  temperature = 0.7 if m % 2 else 1.3
  h, w = _random_hw(3, m, v, h_dtype=h_dtype, w_dtype=w_dtype, scale=3.0)
  cdf = _cdf_f64(h, w, temperature)
  u = _uniforms_off_steps(4, cdf)
  ref = kernels.projected_inverse_cdf(
      h, w, u, temperature=temperature, impl='reference')
  # The float64 CDF agrees away from steps: smallest v with F(v) >= u.
  np.testing.assert_array_equal(
      ref, np.argmax(cdf >= np.asarray(u)[:, None], axis=1))
  for impl in BLOCKWISE:
    got = kernels.projected_inverse_cdf(
        h, w, u, temperature=temperature, impl=impl,
        **_blocks(impl, block_m, block_v, chunk))
    assert got.dtype == jnp.int32 and got.shape == (m,)
    np.testing.assert_array_equal(got, ref, err_msg=impl)


def _step_problem(positions, v):
  """Probabilities [0.25, 0.25, 0.5] at `positions`, 0 (logit -inf) elsewhere.

  In float32 exp(log .25 - log .5) == 0.5 exactly, so the unnormalised CDF is
  [0.5, 1, 2] with no rounding and u on a step is exactly on it.
  """
  logits = np.full((1, v), -np.inf, np.float32)
  logits[0, list(positions)] = np.log(np.array([0.25, 0.25, 0.5], np.float32))
  return jnp.asarray(logits)


STEP_U = np.array([
    0.0,
    0.25,
    np.nextafter(np.float32(0.25), np.float32(1)),
    0.5,
    np.nextafter(np.float32(0.5), np.float32(1)),
    0.75,
    np.nextafter(np.float32(1), np.float32(0)),
], np.float32)
# Token index (0, 1, 2 into `positions`) with F(v) >= u first.
STEP_EXPECTED = np.array([0, 0, 1, 1, 2, 2, 2])


@pytest.mark.parametrize('positions,v,block_v,chunk', [
    ((1, 2, 3), 6, 128, 2),  # Leading and trailing zero-probability tokens.
    ((127, 128, 200), 300, 128, 128),  # Steps across block boundaries.
    pytest.param((0, 150, 299), 300, 256, 7, marks=SLOW),
])
def test_inverse_cdf_exact_steps(positions, v, block_v, chunk):
  w = _step_problem(positions, v)
  h = jnp.ones((len(STEP_U), 1), jnp.float32)  # Logits are exactly log(p).
  u = jnp.asarray(STEP_U)
  expected = np.array(positions)[STEP_EXPECTED]
  for impl in ('reference',) + BLOCKWISE:
    got = kernels.projected_inverse_cdf(
        h, w, u, impl=impl, **_blocks(impl, 8, block_v, chunk))
    np.testing.assert_array_equal(got, expected, err_msg=impl)


def test_inverse_cdf_never_returns_zero_probability_token():
  # Zero-probability (-inf) tokens lead, trail and separate the support; u = 0
  # must give the first supported token and u just below 1 the last one.
  v = 300
  logits = np.full((1, v), -np.inf, np.float32)
  logits[0, 5:15] = 0.0
  logits[0, 150] = -30.0  # Tiny but nonzero mass after a -inf gap.
  w = jnp.asarray(logits)
  h = jnp.ones((3, 1), jnp.float32)
  u = jnp.asarray([0.0, 0.5, np.nextafter(np.float32(1), np.float32(0))])
  for impl in ('reference',) + BLOCKWISE:
    got = np.asarray(kernels.projected_inverse_cdf(
        h, w, u, impl=impl, **_blocks(impl, 8, 128, 64)))
    np.testing.assert_array_equal(got, [5, 9, 14], err_msg=impl)


def test_inverse_cdf_clips_to_support():
  # The clip is a safety net for u * total overshooting the running CDF
  # (blockwise totals round differently from the final running sum).
  got = projected_sampling._finish(
      jnp.array([0, 7, 300, 3]), jnp.array([5, 5, 5, 0]),
      jnp.array([150, 150, 150, -1]), jnp.array([True, True, True, False]))
  np.testing.assert_array_equal(got, [5, 7, 150, 0])


# ----------------------------------------------------------- cross-entropy --


def _ce_value_and_grads(impl, h, w, targets, weights, **kw):
  def objective(h, w):
    loss, argmax = kernels.projected_cross_entropy(
        h, w, targets, impl=impl, **kw)
    return jnp.sum(loss * weights), (loss, argmax)

  # One jit: compiling fwd + bwd together is much cheaper than eager dispatch.
  value_and_grad = jax.jit(
      jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))
  (_, (loss, argmax)), (dh, dw) = value_and_grad(h, w)
  return loss, argmax, dh, dw


def _assert_close(got, want, rtol, atol_frac, what):
  got = np.asarray(got, np.float32)
  want = np.asarray(want, np.float32)
  atol = atol_frac * float(np.max(np.abs(want)))
  np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)


@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_cross_entropy_matches_reference(m, v, block_m, block_v, chunk,
                                         h_dtype, w_dtype):
  h, w = _random_hw(5, m, v, h_dtype=h_dtype, w_dtype=w_dtype, scale=3.0)
  rng = np.random.default_rng(6)
  targets = jnp.asarray(rng.integers(0, v, size=m), jnp.int32)
  weights = jnp.asarray(rng.uniform(0.5, 2.0, size=m), jnp.float32)
  ref = _ce_value_and_grads('reference', h, w, targets, weights)
  # f32: rtol 1e-5 (atol 1e-6 of the largest entry, for near-zero entries).
  # bf16: the gradients are rounded to bf16 (8-bit mantissa) in both.
  low = jnp.bfloat16 in (h_dtype, w_dtype)
  rtol, atol_frac = (2e-2, 1e-2) if low else (1e-5, 1e-6)
  for impl in BLOCKWISE:
    loss, argmax, dh, dw = _ce_value_and_grads(
        impl, h, w, targets, weights, **_blocks(impl, block_m, block_v, chunk))
    assert loss.dtype == jnp.float32 and argmax.dtype == jnp.int32
    assert dh.dtype == h.dtype and dw.dtype == w.dtype
    _assert_close(loss, ref[0], 1e-5 if not low else 1e-4, 1e-6,
                  f'{impl} loss')
    np.testing.assert_array_equal(argmax, ref[1], err_msg=f'{impl} argmax')
    _assert_close(dh, ref[2], rtol, atol_frac, f'{impl} dh')
    _assert_close(dw, ref[3], rtol, atol_frac, f'{impl} dw')


def test_cross_entropy_reference_is_textbook():
  h, w = _random_hw(7, 4, 50)
  targets = jnp.asarray([0, 7, 49, 3], jnp.int32)
  logits = _logits_f64(h, w)
  lse = np.log(np.sum(np.exp(logits), axis=1))
  want = lse - logits[np.arange(4), np.asarray(targets)]
  loss, argmax = kernels.projected_cross_entropy(
      h, w, targets, impl='reference')
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_array_equal(argmax, np.argmax(logits, axis=1))


def test_cross_entropy_argmax_ties():
  h, w, expected = _tied_problem(jnp.float32)
  targets = jnp.zeros((h.shape[0],), jnp.int32)
  for impl, kw in [('reference', {}), ('pallas', dict(block_v=128)),
                   ('chunked', dict(block_v=128))]:
    _, argmax = kernels.projected_cross_entropy(h, w, targets, impl=impl,
                                                **kw)
    np.testing.assert_array_equal(argmax, expected, err_msg=impl)


# -------------------------------------------------------------- dispatcher --


def _all_shapes(jaxpr):
  """Shapes of every value produced anywhere in a (nested) jaxpr."""
  shapes = []
  for eqn in jaxpr.eqns:
    shapes += [tuple(getattr(x.aval, 'shape', ())) for x in eqn.outvars]
    for sub in jax_core.jaxprs_in_params(eqn.params):
      shapes += _all_shapes(sub)
  return shapes


def _primitives(jaxpr):
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in jax_core.jaxprs_in_params(eqn.params):
      names |= _primitives(sub)
  return names


def test_auto_selects_chunked_on_cpu():
  assert jax.default_backend() == 'cpu'
  assert _common.resolve_impl('auto', 'f') == 'chunked'
  h, w = _random_hw(8, 4, 300)
  u = jnp.full((4,), 0.5)
  targets = jnp.zeros((4,), jnp.int32)
  calls = {
      'argmax': lambda impl: kernels.projected_argmax(h, w, impl=impl),
      'inverse_cdf': lambda impl: kernels.projected_inverse_cdf(
          h, w, u, impl=impl),
      'cross_entropy': lambda impl: kernels.projected_cross_entropy(
          h, w, targets, impl=impl),
  }
  for name, call in calls.items():
    auto = _primitives(jax.make_jaxpr(lambda: call('auto'))().jaxpr)
    chunked = _primitives(jax.make_jaxpr(lambda: call('chunked'))().jaxpr)
    pallas = _primitives(jax.make_jaxpr(lambda: call('pallas'))().jaxpr)
    assert auto == chunked, name
    assert 'pallas_call' in pallas and 'pallas_call' not in auto, name


def test_auto_on_other_backends(monkeypatch):
  monkeypatch.setattr(_common, 'backend', lambda: 'tpu')
  assert _common.resolve_impl('auto', 'f') == 'pallas'
  assert not _common.resolve_interpret('f', None)
  monkeypatch.setattr(_common, 'backend', lambda: 'gpu')
  assert _common.resolve_impl('auto', 'f') == 'chunked'
  assert _common.resolve_impl('pallas', 'f') == 'pallas'
  assert _common.resolve_interpret('f', True)
  with pytest.raises(NotImplementedError, match='chunked'):
    _common.resolve_interpret('f', None)
  h, w = _random_hw(14, 3, 50)
  targets = jnp.asarray([0, 7, 49])
  # 'auto' on a GPU: the chunked variant, which runs here too.
  np.testing.assert_allclose(
      kernels.projected_cross_entropy(h, w, targets)[0],
      kernels.projected_cross_entropy(h, w, targets, impl='reference')[0],
      rtol=1e-5)
  with pytest.raises(NotImplementedError):
    kernels.projected_argmax(h, w, impl='pallas')
  monkeypatch.setattr(_common, 'backend', lambda: 'cpu')
  assert _common.resolve_interpret('f', None)


def test_chunked_never_materialises_logits():
  m, d, v = 24, 16, 1000  # m, d, v distinct so shapes are unambiguous.
  h, w = _random_hw(9, m, v, d=d)
  targets = jnp.zeros((m,), jnp.int32)
  u = jnp.full((m,), 0.5)
  counts = jnp.zeros((m, v), jnp.int32)

  def ce_grads(h, w):
    return jax.grad(lambda h, w: jnp.sum(kernels.projected_cross_entropy(
        h, w, targets, impl='chunked', block_v=128)[0]), argnums=(0, 1))(h, w)

  fns = [
      lambda h, w: kernels.projected_argmax(h, w, impl='chunked', block_v=128),
      lambda h, w: kernels.projected_argmax(
          h, w, counts_MxV=counts, penalty=0.5, impl='chunked', block_v=128),
      lambda h, w: kernels.projected_inverse_cdf(
          h, w, u, impl='chunked', block_v=128),
      ce_grads,
  ]
  for fn in fns:
    shapes = _all_shapes(jax.make_jaxpr(fn)(h, w).jaxpr)
    assert all(np.prod(s) < m * v for s in shapes if s != (d, v)), shapes
  # And the check can fail: the reference does build (M, V).
  ref_shapes = _all_shapes(jax.make_jaxpr(
      lambda h, w: kernels.projected_argmax(h, w, impl='reference'))(h, w)
                           .jaxpr)
  assert (m, v) in ref_shapes


def test_jit_with_traced_scalars():
  h, w = _random_hw(10, 5, 300, scale=3.0)
  counts = jnp.asarray(
      np.random.default_rng(11).integers(0, 3, size=(5, 300)), jnp.int32)
  u = jnp.asarray(np.random.default_rng(12).uniform(size=5), jnp.float32)

  @jax.jit
  def run(h, w, penalty, temperature):
    out = {}
    for impl in ('reference',) + BLOCKWISE:
      out[impl] = (kernels.projected_argmax(
          h, w, counts_MxV=counts, penalty=penalty, impl=impl, block_v=128),
                   kernels.projected_inverse_cdf(
                       h, w, u, temperature=temperature, impl=impl,
                       block_v=128))
    return out

  out = run(h, w, 0.3, 0.8)
  for impl in BLOCKWISE:
    np.testing.assert_array_equal(out[impl][0], out['reference'][0])
    np.testing.assert_array_equal(out[impl][1], out['reference'][1])
  # The traced values are the ones used: equal to the concrete calls, and
  # they matter (another penalty and temperature give other tokens).
  eager = (kernels.projected_argmax(h, w, counts_MxV=counts, penalty=0.3,
                                    impl='reference'),
           kernels.projected_inverse_cdf(h, w, u, temperature=0.8,
                                         impl='reference'))
  np.testing.assert_array_equal(out['reference'][0], eager[0])
  np.testing.assert_array_equal(out['reference'][1], eager[1])
  other = run(h, w, 0.0, 5.0)['reference']
  assert not np.array_equal(other[0], eager[0])
  assert not np.array_equal(other[1], eager[1])


@pytest.mark.parametrize('fn', ['argmax', 'inverse_cdf', 'cross_entropy'])
def test_bad_impl_and_shapes_raise(fn):
  h, w = _random_hw(13, 4, 50)

  def call(h=h, w=w, rows=4, impl='auto', **kw):
    if fn == 'argmax':
      return kernels.projected_argmax(h, w, impl=impl, **kw)
    if fn == 'inverse_cdf':
      return kernels.projected_inverse_cdf(
          h, w, jnp.zeros((rows,)), impl=impl, **kw)
    return kernels.projected_cross_entropy(
        h, w, jnp.zeros((rows,), jnp.int32), impl=impl, **kw)

  with pytest.raises(ValueError, match='triton'):
    call(impl='triton')
  with pytest.raises(ValueError, match=r'\(4, 32\).*\(31, 50\)'):
    call(w=w[:31])
  with pytest.raises(ValueError, match=r'h.shape=\(4,\)'):
    call(h=h[:, 0], w=w)
  with pytest.raises(ValueError, match='multiple of 128'):
    call(impl='pallas', block_v=100)
  with pytest.raises(ValueError, match='multiple of 8'):
    call(impl='pallas', block_m=12)
  if fn == 'argmax':
    with pytest.raises(ValueError, match=r'\(4, 50\).*\(4, 49\)'):
      call(counts_MxV=jnp.zeros((4, 49), jnp.int32))
  else:
    with pytest.raises(ValueError, match=r'\(4,\).*\(3,\)'):
      call(rows=3)


@pytest.mark.parametrize('impl', ['reference', 'chunked', 'pallas'])
def test_a_concrete_non_positive_temperature_is_refused(impl):
  # Only Python scalars were checked: np.float32(0) sampled token 0 on
  # every row and a negative numpy temperature inverted the distribution.
  h, w = _random_hw(0, 3, 20, d=8)
  u = jnp.asarray([0.1, 0.5, 0.9])
  for bad in (0.0, -1, np.float32(0), np.float32(-1), jnp.asarray(-1.0)):
    with pytest.raises(ValueError, match='temperature must be > 0'):
      kernels.projected_inverse_cdf(h, w, u, temperature=bad, impl=impl)
  # A traced temperature is the caller's to check; a good one samples as
  # the Python scalar does.
  sample = jax.jit(lambda t: kernels.projected_inverse_cdf(
      h, w, u, temperature=t, impl=impl))
  np.testing.assert_array_equal(sample(np.float32(0.7)),
                                kernels.projected_inverse_cdf(
                                    h, w, u, temperature=0.7, impl=impl))
  # A bfloat16 temperature is a number (numpy calls its kind 'V').
  np.testing.assert_array_equal(
      kernels.projected_inverse_cdf(h, w, u, temperature=jnp.bfloat16(0.5),
                                    impl=impl),
      kernels.projected_inverse_cdf(h, w, u, temperature=0.5, impl=impl))


@pytest.mark.parametrize('impl', ['reference', 'chunked', 'pallas'])
def test_concrete_targets_and_uniforms_outside_their_range_are_refused(impl):
  # Each variant read them its own way, none with an error: target V gave
  # inf, nan or a finite loss; u = 1.5 the last token, NaN the first.
  h, w = _random_hw(0, 3, 300, d=8)
  blocks = _blocks(impl, 8, 128, 64)
  for bad, shown in ((300, '300'), (-1, '-1'), (2**33, str(2**33))):
    targets = np.array([0, bad, 5])
    with pytest.raises(ValueError, match=rf'targets must be in \[0, V=300\)'
                       rf', got {shown} at row 1'):
      kernels.projected_cross_entropy(h, w, targets, impl=impl, **blocks)
  for bad in (1.0, 1.5, -0.25, np.nan):
    u = jnp.asarray([0.5, 0.5, bad])
    with pytest.raises(ValueError, match=r'u must be finite and in \[0, 1\)'
                       r', got .* at row 2'):
      kernels.projected_inverse_cdf(h, w, u, impl=impl, **blocks)
  # Under jit the values are the caller's: checked nowhere, and in range
  # the results equal the eager ones.
  u, targets = jnp.asarray([0.1, 0.5, 0.9]), jnp.asarray([0, 299, 5])
  np.testing.assert_array_equal(
      jax.jit(lambda u: kernels.projected_inverse_cdf(
          h, w, u, impl=impl, **blocks))(u),
      kernels.projected_inverse_cdf(h, w, u, impl=impl, **blocks))
  np.testing.assert_allclose(
      jax.jit(lambda t: kernels.projected_cross_entropy(
          h, w, t, impl=impl, **blocks)[0])(targets),
      kernels.projected_cross_entropy(h, w, targets, impl=impl,
                                      **blocks)[0], rtol=1e-6)


@pytest.mark.parametrize('fn', ['argmax', 'inverse_cdf', 'cross_entropy'])
def test_inputs_that_are_not_arrays_are_named(fn):
  # A list failed with "AttributeError: 'list' object has no attribute
  # 'ndim'"; interpret='no' was truthy and a string temperature a numpy
  # UFuncTypeError.
  h, w = _random_hw(0, 2, 20, d=4)
  call = {
      'argmax': lambda h, w, rows, **kw: kernels.projected_argmax(
          h, w, counts_MxV=rows if kw.pop('as_rows', False) else None, **kw),
      'inverse_cdf': lambda h, w, rows, **kw: kernels.projected_inverse_cdf(
          h, w, rows, **kw),
      'cross_entropy': lambda h, w, rows, **kw:
          kernels.projected_cross_entropy(h, w, rows, **kw),
  }[fn]
  rows = {'argmax': [[0] * 20] * 2, 'inverse_cdf': [0.5, 0.5],
          'cross_entropy': [1, 2]}[fn]
  row_name = {'argmax': 'counts', 'inverse_cdf': 'u',
              'cross_entropy': 'targets'}[fn]
  good_rows = jnp.asarray(rows)
  with pytest.raises(TypeError, match=r'h must be an array \(numpy or jax\)'
                     ', got list'):
    call(h.tolist(), w, good_rows)
  with pytest.raises(TypeError, match='w must be an array'):
    call(h, w.tolist(), good_rows)
  with pytest.raises(TypeError, match=f'{row_name} must be an array'):
    call(h, w, rows, as_rows=True) if fn == 'argmax' else call(h, w, rows)
  with pytest.raises(ValueError, match="interpret must be a bool or None, "
                     "got 'no'"):
    call(h, w, good_rows, impl='pallas', interpret='no')
  if fn == 'inverse_cdf':
    with pytest.raises(ValueError, match="temperature must be a number > 0, "
                       "got '1'"):
      call(h, w, good_rows, temperature='1')


def test_pallas_kernels_lower_for_tpu(monkeypatch):
  """Pallas -> Mosaic TPU lowering (no TPU needed; Mosaic compile not run).

  Catches primitives without a Mosaic lowering rule and block shapes that
  break TPU tiling rules, which interpret mode on CPU cannot see.
  """
  monkeypatch.setattr(_common, 'backend', lambda: 'tpu')
  m, d, v = 24, 128, 1000
  h = jax.ShapeDtypeStruct((m, d), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((d, v), jnp.float32)
  counts = jax.ShapeDtypeStruct((m, v), jnp.int32)
  u = jax.ShapeDtypeStruct((m,), jnp.float32)
  targets = jax.ShapeDtypeStruct((m,), jnp.int32)

  def ce_grads(h, w, targets):
    return jax.grad(lambda h, w: jnp.sum(kernels.projected_cross_entropy(
        h, w, targets, impl='pallas')[0]), argnums=(0, 1))(h, w)

  cases = [
      (lambda h, w, c: kernels.projected_argmax(
          h, w, counts_MxV=c, penalty=0.5, impl='pallas'), (h, w, counts), 1),
      (lambda h, w, u: kernels.projected_inverse_cdf(
          h, w, u, temperature=0.7, impl='pallas'), (h, w, u), 2),
      (ce_grads, (h, w, targets), 3),
  ]
  for fn, args, n_kernels in cases:
    text = jax.jit(fn).trace(*args).lower(
        lowering_platforms=('tpu',)).as_text()
    assert text.count('tpu_custom_call') == n_kernels
