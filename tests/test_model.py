"""Model invariants: causality, cached step == full forward, layouts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kforcing_jax import decode
from kforcing_jax import layouts
from kforcing_jax import model as model_lib

# f32 on CPU: the cached and the full forward reduce in different orders, so
# logits agree to rounding only. 1e-5 absolute on O(1) logits is far below
# any real bug (a wrong mask or position moves logits by >1e-2).
ATOL = 1e-5


def _setup(cfg, seed=0, batch=2, length=20):
  params = model_lib.init_params(cfg, jax.random.PRNGKey(seed))
  tokens = jax.random.randint(jax.random.PRNGKey(seed + 1), (batch, length),
                              0, cfg.vocab_size)
  return model_lib.Transformer(cfg), params, tokens


def test_full_forward_is_causal_by_gradient(small_cfg):
  model, params, tokens = _setup(small_cfg)
  t = 7

  def logit_at_t(emb):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    h, _ = model.apply({'params': params}, emb, positions,
                       model_lib.causal_mask(tokens.shape[1]),
                       method=model_lib.Transformer.backbone)
    return h[:, t].sum()

  emb = model.apply({'params': params}, tokens,
                    method=model_lib.Transformer.embed_tokens)
  grad = jax.grad(logit_at_t)(emb)
  norms = jnp.abs(grad).sum(axis=(0, 2))
  assert float(norms[t + 1:].max()) == 0.0
  assert float(norms[:t + 1].min()) > 0.0  # Everything before t matters.


def test_full_forward_is_causal_by_perturbation(small_cfg):
  model, params, tokens = _setup(small_cfg)
  t = 11
  changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 5) % 61)
  a = model.apply({'params': params}, tokens)
  b = model.apply({'params': params}, changed)
  np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=ATOL)
  assert float(jnp.abs(a[:, t + 1:] - b[:, t + 1:]).max()) > 1e-3


def _zero_cache(cfg, b, cache_size, transposed_keys=False):
  """Empty per-layer KV cache, written out by hand (not via init_cache)."""
  shape = (b * cfg.num_heads, cache_size, cfg.head_dim)
  keys = (('kt', (b * cfg.num_heads, cfg.head_dim, cache_size))
          if transposed_keys else ('k', shape))
  return tuple({keys[0]: jnp.zeros(keys[1]), 'v': jnp.zeros(shape)}
               for _ in range(cfg.num_layers))


def _run_cached(model, params, tokens, chunks, cache_size,
                transposed_keys=False):
  """Feeds tokens in chunks through cached_step; returns all logits."""
  b = tokens.shape[0]
  cache = _zero_cache(model.cfg, b, cache_size, transposed_keys)
  pad = jnp.zeros((b,), jnp.int32)

  @jax.jit  # Op by op, every chunk width compiled each op on its own.
  def step(params, chunk, positions, mask, cache, index):
    h, cache = model.apply({'params': params}, chunk, None, positions, mask,
                           cache, index,
                           method=model_lib.Transformer.cached_step)
    return model.apply({'params': params}, h,
                       method=model_lib.Transformer.project), cache

  outs, index = [], 0
  for n in chunks:
    positions, mask = layouts.decode_layout(pad, index, n, cache_size)
    logits, cache = step(params, tokens[:, index:index + n], positions, mask,
                         cache, index)
    outs.append(logits)
    index += n
  return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('transposed_keys', [False, True])
def test_cached_steps_equal_full_forward(small_cfg, dtype, transposed_keys):
  cfg = dataclasses.replace(small_cfg, dtype=dtype)
  model, params, tokens = _setup(cfg, length=20)
  full = model.apply({'params': params}, tokens)
  # Prefill 8, then steps of several new positions at once, then single ones.
  cached = _run_cached(model, params, tokens, [8, 3, 4, 1, 1, 3], 24,
                       transposed_keys)
  atol = ATOL if dtype == 'float32' else 5e-2  # bf16: ~3 significant digits.
  np.testing.assert_allclose(cached, full, atol=atol)


@pytest.mark.parametrize('transposed_keys', [False, True])
def test_num_out_computes_only_the_last_positions(small_cfg,
                                                  transposed_keys):
  # A decode step asks for its emitting positions only (num_out): hidden
  # states must equal the last rows of the full step, and the cache every
  # position writes (last block included) must be the same.
  model, params, tokens = _setup(small_cfg, length=12)
  b, size, n = 2, 16, 3
  cache = _zero_cache(small_cfg, b, size, transposed_keys)
  positions, mask = layouts.decode_layout(jnp.zeros((b,), jnp.int32), 0, 12,
                                          size)
  step = lambda num_out: model.apply(
      {'params': params}, tokens, None, positions, mask, cache, 0, num_out,
      method=model_lib.Transformer.cached_step)
  h_all, cache_all = step(None)
  h_last, cache_last = step(n)
  assert h_last.shape == (b, n, small_cfg.d_model)
  np.testing.assert_allclose(h_last, h_all[:, -n:], atol=ATOL)
  for got, want in zip(jax.tree.leaves(cache_last),
                       jax.tree.leaves(cache_all)):
    np.testing.assert_allclose(got, want, atol=ATOL)
  assert float(jnp.abs(cache_all[-1]['v']).max()) > 0  # Last block wrote.


@pytest.mark.parametrize('fed_tokens', [0, 2])
def test_pf_hidden_equals_the_unpruned_backbone(small_cfg, fed_tokens):
  # pf_hidden skips the context rows in the last block; its slot states must
  # equal those of the plain backbone over the same inputs.
  k = 2
  cfg = dataclasses.replace(small_cfg, noise_window=k)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  model = model_lib.Transformer(cfg)
  b, n = 2, 10
  tokens = jax.random.randint(jax.random.PRNGKey(1), (b, n), 0, 61)
  windows = jnp.array([[0, 3, 5], [2, 6, 1]])
  u = jax.random.uniform(jax.random.PRNGKey(2), windows.shape + (k,))
  fed = jax.random.randint(jax.random.PRNGKey(3), windows.shape + (fed_tokens,),
                           0, 61)
  positions, mask = layouts.pf_train_layout(windows, n, fed_tokens + k)
  got = model.apply({'params': params}, tokens, fed, u, positions, mask,
                    method=model_lib.Transformer.pf_hidden)

  def unpruned(module):
    window = module.embed_noise(u)
    if fed_tokens:
      window = jnp.concatenate([module.embed_tokens(fed), window], axis=2)
    x = jnp.concatenate([module.embed_tokens(tokens),
                         window.reshape(b, -1, cfg.d_model)], axis=1)
    h, _ = module.backbone(x, positions, mask)
    return h[:, n:].reshape(b, 3, fed_tokens + k, -1)[:, :, fed_tokens:]

  want = model.apply({'params': params}, method=unpruned)
  assert got.shape == (b, 3, k, cfg.d_model)
  np.testing.assert_allclose(got, want, atol=ATOL)


def test_cached_step_is_causal(small_cfg):
  model, params, tokens = _setup(small_cfg, length=12)
  a = _run_cached(model, params, tokens, [6, 6], 12)
  changed = tokens.at[:, 9:].set((tokens[:, 9:] + 3) % 61)
  b = _run_cached(model, params, changed, [6, 6], 12)
  np.testing.assert_allclose(a[:, :9], b[:, :9], atol=ATOL)
  assert float(jnp.abs(a[:, 9:] - b[:, 9:]).max()) > 1e-3


def test_left_padded_prompt_matches_unpadded(small_cfg):
  model, params, tokens = _setup(small_cfg, batch=1, length=10)
  b = 1
  size = 13
  pad = jnp.array([3], jnp.int32)
  padded = jnp.concatenate([jnp.zeros((b, 3), jnp.int32), tokens], axis=1)
  cache = _zero_cache(small_cfg, b, size)
  positions, mask = layouts.decode_layout(pad, 0, 13, size)
  h, _ = model.apply({'params': params}, padded, None, positions, mask, cache,
                     0, method=model_lib.Transformer.cached_step)
  got = model.apply({'params': params}, h[:, 3:],
                    method=model_lib.Transformer.project)
  np.testing.assert_allclose(got, model.apply({'params': params}, tokens),
                             atol=ATOL)


def test_pf_train_layout_matches_brute_force():
  windows = np.array([[0, 3, 5], [4, 4, 1]])
  n, k = 6, 3
  positions, mask = layouts.pf_train_layout(windows, n, k)
  positions, mask = np.asarray(positions), np.asarray(mask)
  for b in range(2):
    kinds = [('ctx', i, None) for i in range(n)] + [
        ('slot', m, i) for m in range(3) for i in range(k)]
    for q, (qk, qa, qb) in enumerate(kinds):
      expected_pos = qa if qk == 'ctx' else windows[b, qa] + 1 + qb
      assert positions[b, q] == expected_pos
      for s, (sk, sa, sb) in enumerate(kinds):
        if qk == 'ctx':
          want = sk == 'ctx' and sa <= qa
        elif sk == 'ctx':
          want = sa <= windows[b, qa]
        else:
          want = sa == qa and sb <= qb
        assert mask[b, q, s] == want, (b, kinds[q], kinds[s])


def test_dropout_only_in_training_mode(small_cfg):
  cfg = dataclasses.replace(small_cfg, dropout_rate=0.5)
  model, params, tokens = _setup(cfg)
  a = model.apply({'params': params}, tokens)
  b = model.apply({'params': params}, tokens)
  np.testing.assert_array_equal(a, b)
  c = model.apply({'params': params}, tokens, deterministic=False,
                  rngs={'dropout': jax.random.PRNGKey(3)})
  assert float(jnp.abs(a - c).max()) > 1e-3


@pytest.mark.parametrize('field,value,needle', [
    ('num_heads', 5, 'num_heads=5'),
    ('d_model', 0, 'model.d_model=0 must be >= 1'),
    ('dtype', 'float16', "dtype='float16'"),
    ('dropout_rate', 1.5, 'dropout_rate=1.5'),
])
def test_model_config_errors_name_the_value(small_cfg, field, value, needle):
  with pytest.raises(ValueError, match=needle.replace('(', r'\(')):
    dataclasses.replace(small_cfg, **{field: value})


def test_student_init_touches_noise_encoder(small_cfg):
  cfg = dataclasses.replace(small_cfg, noise_window=2)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  assert 'noise_encoder' in params
  teacher = model_lib.init_params(small_cfg, jax.random.PRNGKey(0))
  assert 'noise_encoder' not in teacher
  assert set(teacher) < set(params)


def _rope(cfg, x, pos):
  """The model's rotary embedding of x at integer positions."""
  return model_lib.rotate(x, *model_lib.rope_tables(cfg, jnp.asarray(pos)))


def test_rope_is_a_complex_rotation_by_position_times_frequency():
  # Rotate-half form: pairs (x_j, x_{j+half}) are the complex number
  # x_j + i x_{j+half}, multiplied by exp(i * pos * base^(-j/half)).
  cfg = model_lib.ModelConfig(vocab_size=10, seq_len=128, num_layers=1,
                              d_model=24, num_heads=3, mlp_dim=8,
                              rope_base=100.0)  # head_dim 8.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  pos = np.array([[0, 1, 7, 30, 127], [3, 3, 50, 2, 9]])
  got = np.asarray(_rope(cfg, jnp.asarray(x), pos), np.float64)
  half = 4
  freqs = 100.0 ** (-np.arange(half) / half)
  z = (x[..., :half] + 1j * x[..., half:]).astype(np.complex128)
  z = z * np.exp(1j * pos[:, :, None, None] * freqs)
  np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], -1),
                             atol=2e-5)


def test_rope_tables_are_exact_over_the_span_the_model_uses(small_cfg):
  # The model looks its rotary angles up in a host-made table; inside
  # rope_span it must match the formula, and the span must hold the
  # positions the layouts give: left padding (down to 1 - seq_len) and a
  # training window of noise_window slots even at t = seq_len - 1 (decode
  # loops that could pass it are refused: see the next test).
  cfg = dataclasses.replace(small_cfg, noise_window=4)
  lo, hi = model_lib.rope_span(cfg)
  assert lo <= 1 - cfg.seq_len
  train_pos, _ = layouts.pf_train_layout(
      jnp.array([[0, cfg.seq_len - 1]]), cfg.seq_len, cfg.noise_window)
  assert lo <= int(train_pos.min()) and int(train_pos.max()) < hi
  pos = np.arange(lo, hi)[None]
  cos, sin = model_lib.rope_tables(cfg, jnp.asarray(pos))
  half = cfg.head_dim // 2
  angles = pos[..., None] * cfg.rope_base ** (-np.arange(half) / half)
  np.testing.assert_allclose(np.asarray(cos), np.cos(angles), atol=1e-6)
  np.testing.assert_allclose(np.asarray(sin), np.sin(angles), atol=1e-6)
  # Outside the span, positions clip to its ends.
  out_cos, _ = model_lib.rope_tables(cfg, jnp.array([[lo - 5, hi + 5]]))
  np.testing.assert_array_equal(np.asarray(out_cos[0]),
                                np.asarray(cos[0, [0, -1]]))


def test_inputs_longer_than_the_rotary_table_are_refused(small_cfg):
  # Past rope_span the angles would be clipped, not extrapolated: the
  # full forward and a decode spec refuse such lengths before compute.
  _, hi = model_lib.rope_span(small_cfg)
  params = model_lib.init_params(small_cfg, jax.random.PRNGKey(0))
  model = model_lib.Transformer(small_cfg)
  model.apply({'params': params}, jnp.zeros((1, hi), jnp.int32))
  with pytest.raises(ValueError, match=f'{hi + 1} tokens exceed the {hi}'):
    model.apply({'params': params}, jnp.zeros((1, hi + 1), jnp.int32))
  decode.DecodeSpec(model=small_cfg, k=1, num_steps=hi - 2, prompt_len=2)
  with pytest.raises(ValueError, match=f'= {hi + 1} positions exceed'):
    decode.DecodeSpec(model=small_cfg, k=1, num_steps=hi - 1, prompt_len=2)


def test_rope_scores_depend_on_relative_position_only():
  # <rope(q, p), rope(k, s)> is a function of p - s: shifting both keeps the
  # score, changing the offset changes it. Attention relies on both.
  cfg = model_lib.ModelConfig(vocab_size=10, seq_len=128, num_layers=1,
                              d_model=16, num_heads=1, mlp_dim=8)
  rng = np.random.default_rng(1)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
          for _ in range(2))

  def score(p, s):
    rq = _rope(cfg, q, [[p]])
    rk = _rope(cfg, k, [[s]])
    return float(jnp.sum(rq * rk))

  assert score(9, 4) == pytest.approx(score(105, 100), abs=1e-4)
  assert score(9, 4) == pytest.approx(score(5, 0), abs=1e-4)
  assert abs(score(9, 4) - score(9, 5)) > 1e-2


def test_model_config_ints_normalised_and_non_ints_rejected(small_cfg):
  # numpy ints (e.g. from a loaded array) are accepted and stored as int,
  # so equal configs hash equal (jit static args); floats are not ints.
  cfg = dataclasses.replace(small_cfg, d_model=np.int64(32),
                            noise_window=np.int32(2))
  assert type(cfg.d_model) is int and type(cfg.noise_window) is int
  assert hash(cfg) == hash(dataclasses.replace(small_cfg, noise_window=2))
  with pytest.raises(ValueError, match='model.noise_window must be an int, got 2.5'):
    dataclasses.replace(small_cfg, noise_window=2.5)
  with pytest.raises(ValueError, match='model.num_layers must be an int'):
    dataclasses.replace(small_cfg, num_layers=True)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_model_logits_are_the_projection_logits(dtype):
  # One set of logits per model: the full forward (teacher eval, noise
  # inversion) and projection.logits (decoding, losses) must agree exactly,
  # bfloat16 included (the unembedding used to run in bfloat16 there).
  from kforcing_jax import projection  # pylint: disable=g-import-not-at-top
  cfg = model_lib.ModelConfig(vocab_size=1000, seq_len=32, num_layers=2,
                              d_model=64, num_heads=4, mlp_dim=128,
                              dtype=dtype)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 32), 0, 1000)
  model = model_lib.Transformer(cfg)
  full = model.apply({'params': params}, tokens)
  h = model.apply({'params': params}, tokens,
                  method=model_lib.Transformer.hidden)
  np.testing.assert_array_equal(
      full, projection.logits(h, params['unembed']['kernel']))
  assert full.dtype == jnp.float32


def test_compute_params_casts_exactly_what_the_layers_cast(small_cfg):
  # Only the blocks' dense weights, which flax casts to the compute dtype
  # anyway; norms, embedding, unembedding and noise encoder stay float32.
  cfg = dataclasses.replace(small_cfg, dtype='bfloat16', noise_window=2)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  cast = model_lib.compute_params(cfg, params)
  names = jax.tree_util.tree_leaves_with_path(cast)
  bf16 = sorted(jax.tree_util.keystr(p) for p, x in names
                if x.dtype == jnp.bfloat16)
  per_block = ["['attn']['key']['kernel']", "['attn']['out']['kernel']",
               "['attn']['query']['kernel']", "['attn']['value']['kernel']",
               "['mlp_in']['bias']", "['mlp_in']['kernel']",
               "['mlp_out']['bias']", "['mlp_out']['kernel']"]
  assert bf16 == sorted(f"['block_{i}']{n}" for i in range(cfg.num_layers)
                        for n in per_block)
  f32 = dataclasses.replace(cfg, dtype='float32')
  assert model_lib.compute_params(f32, params) is params
