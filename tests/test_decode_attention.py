"""The Pallas cached-attention kernel: == the XLA attention, in the loop too.

On CPU the kernel runs in Pallas interpret mode; the Triton lowering itself
is checked by lowering for CUDA (no GPU needed to lower).
"""

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kforcing_jax import bench
from kforcing_jax import bench_models
from kforcing_jax import bench_schema
from kforcing_jax import bench_settings
from kforcing_jax import decode
from kforcing_jax import layouts
from kforcing_jax import model as model_lib
from kforcing_jax.kernels import decode_attention
from tests import helpers


def _case(b, lq, h, hd, slots, dtype, seed=0, max_pad=2):
  """Random queries and cache, and a decode mask: left padding (up to
  max_pad slots), the cache up to each query's own slot (decode layout)."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, lq, h, hd)), dtype)
  k = jnp.asarray(rng.normal(size=(b * h, slots, hd)), dtype)
  v = jnp.asarray(rng.normal(size=(b * h, slots, hd)), dtype)
  pad = rng.integers(0, max_pad + 1, size=b)
  pad[0] = max_pad
  own = slots - lq + np.arange(lq)
  keys = np.arange(slots)
  mask = (keys[None, None] >= pad[:, None, None]) & (
      keys[None, None] <= own[None, :, None])
  return q, k, v, jnp.asarray(mask)


@pytest.mark.parametrize('lq,slots,dtype,block_s', [
    (8, 130, jnp.float32, 64),  # Push-forward k=4; last block runs past S.
    (6, 32, jnp.float32, 16),  # k=3: rows not a power of two.
    (1, 70, jnp.float32, 32),  # AR: one query.
    (8, 96, jnp.bfloat16, 64),
])
def test_kernel_equals_xla_attention(lq, slots, dtype, block_s):
  q, k, v, mask = _case(2, lq, 3, 16, slots, dtype)
  out = decode_attention.cached_attention(q, k, v, mask, block_s=block_s)
  ref = decode_attention.cached_attention_reference(q, k, v, mask)
  assert out.shape == q.shape and out.dtype == q.dtype
  # bfloat16: the kernel casts unnormalised probabilities (online softmax).
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(ref, np.float32), atol=tol, rtol=tol)


def test_a_first_block_hidden_from_every_query():
  # Padding longer than a block: the online softmax starts from blocks
  # whose every score is masked, and must forget them.
  q, k, v, mask = _case(2, 8, 2, 16, 130, jnp.float32, max_pad=100)
  assert not np.asarray(mask)[0, :, :64].any()
  out = decode_attention.cached_attention(q, k, v, mask, block_s=32)
  ref = decode_attention.cached_attention_reference(q, k, v, mask)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def _eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs in its parameters."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      inner = getattr(value, 'jaxpr', value)
      if hasattr(inner, 'eqns'):
        yield from _eqns(inner)


def test_every_load_and_store_of_the_kernel_is_masked():
  # Interpret mode pads blocks, so it cannot show a read or write past the
  # arrays; on a GPU the 16-row query blocks overhang the L real rows and
  # the cache's last block runs past S. So: no unmasked access at all.
  q, k, v, mask = _case(2, 6, 2, 16, 40, jnp.float32)
  jaxpr = jax.make_jaxpr(decode_attention.cached_attention)(q, k, v, mask)
  [call] = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == 'pallas_call']
  kernel = call.params['jaxpr']
  names = [e.primitive.name for e in _eqns(kernel)]
  assert 'get' not in names and 'swap' not in names  # ref[...] access.
  accesses = [e for e in _eqns(kernel)
              if e.primitive.name in ('masked_load', 'masked_swap')]
  assert len(accesses) == 5  # q, k, v, mask loads and the output store.
  for e in accesses:
    _, _, mask_arg, *_ = e.params['args_tree'].unflatten(e.invars)
    assert mask_arg is not None, e


def test_masked_slots_do_not_count():
  # Changing the keys and values of slots no query sees leaves the output.
  q, k, v, mask = _case(2, 4, 2, 16, 40, jnp.float32, seed=3)
  hidden = ~np.asarray(mask).any(axis=1)  # (B, S): seen by no query.
  assert hidden.any()
  noise = np.repeat(hidden, 2, axis=0)[:, :, None] * 100.0
  out = decode_attention.cached_attention(q, k, v, mask)
  moved = decode_attention.cached_attention(q, k + noise, v - noise, mask)
  np.testing.assert_allclose(np.asarray(out), np.asarray(moved), atol=1e-6)


def test_lowers_to_one_triton_kernel_for_cuda():
  # The Triton lowering (block sizes powers of two, masked tail loads) runs
  # without a GPU: lower for CUDA and find the kernel's custom call.
  f = jax.jit(lambda *a: decode_attention.cached_attention(*a,
                                                           interpret=False))
  shapes = ((8, 8, 12, 64), (96, 130, 64), (96, 130, 64))
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
  args.append(jax.ShapeDtypeStruct((8, 8, 130), bool))
  triton = '__gpu$xla.gpu.triton'
  exported = jax.export.export(
      f, platforms=['cuda'],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)])(
          *args)
  text = exported.mlir_module()
  assert text.count(f'@{triton}') == 1
  # Query blocks overhang the L rows (masked), so no pad or slice of the
  # queries or the output around the kernel: only reshapes and casts.
  assert set(re.findall(r'stablehlo\.(\w+)', text)) == {
      'custom_call', 'reshape', 'convert'}


@pytest.mark.parametrize('change,needle', [
    (dict(hd=24), 'head dim 24'),
    (dict(block_s=48), 'block_s=48'),
    (dict(k_slots=(5, 16)), 'keys have shape'),
    (dict(mask_shape=(2, 4, 9)), 'mask has shape'),
])
def test_bad_inputs_are_named(change, needle):
  hd = change.get('hd', 16)
  q, k, v, mask = _case(2, 4, 2, hd, 16, jnp.float32)
  if 'k_slots' in change:
    k = v = jnp.zeros((change['k_slots'][0], 16, hd))
  if 'mask_shape' in change:
    mask = jnp.ones(change['mask_shape'], bool)
  with pytest.raises(ValueError, match=needle):
    decode_attention.cached_attention(q, k, v, mask,
                                      block_s=change.get('block_s', 64))


def _xla_and_pallas(small_cfg, k, seed=11):
  """decode_variants with XLA's attention and the kernel; head dim 16 (the
  kernel's least), a cache grown in blocks of 8 slots."""
  cfg = dataclasses.replace(small_cfg, num_heads=2)
  return helpers.decode_variants(
      cfg, k, [{'cache_block': 8, 'attention_impl': impl}
               for impl in ('xla', 'pallas')], seed)


@pytest.mark.parametrize('k', [1, 3])
def test_pallas_attention_decodes_the_same_tokens(small_cfg, k):
  # Growing cache, left padding, penalty.
  (_, (xla_tokens, xla_lengths)), (spec, (tokens, lengths)) = (
      _xla_and_pallas(small_cfg, k))
  assert len(spec.segments()) > 2 and decode.key_layout(spec) == 'k'
  np.testing.assert_array_equal(tokens, xla_tokens)
  np.testing.assert_array_equal(lengths, xla_lengths)


def test_pallas_attention_gives_the_same_logits(small_cfg):
  cfg = dataclasses.replace(small_cfg, num_heads=2, noise_window=4)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(2))
  prompts, pad = decode.pad_prompts([[5, 9, 2, 33, 7], [1, 2]])
  noise = jax.random.uniform(jax.random.PRNGKey(3), (2, 4))
  outs = []
  for impl in ('xla', 'pallas'):
    spec = decode.DecodeSpec(model=cfg, k=4, num_steps=2,
                             prompt_len=prompts.shape[1], key_layout='k',
                             attention_impl=impl)
    cache = decode.init_cache(spec, 2)
    outs.append(decode.forward(spec, params, jnp.asarray(prompts), noise,
                               cache, 0, jnp.asarray(pad)))
  (xla_logits, xla_cache), (logits, cache) = outs
  np.testing.assert_allclose(logits, xla_logits, atol=1e-5, rtol=1e-5)
  # The first layer writes the same K/V; later ones read attention output.
  for name in ('k', 'v'):
    np.testing.assert_array_equal(cache[0][name], xla_cache[0][name])
  for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(xla_cache)):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_a_pass_longer_than_the_kernel_takes_attends_with_xla(
    small_cfg, monkeypatch):
  # A long prompt's prefill has more queries than the kernel holds: it goes
  # to XLA, the steps to the kernel, and the tokens stay the same.
  monkeypatch.setattr(decode_attention, 'MAX_QUERIES', 6)
  jax.clear_caches()  # Trace the loops anew: the count is taken there.
  seen = []
  kernel = decode_attention.cached_attention

  def counting(q, *args, **kwargs):
    seen.append(q.shape[1])
    return kernel(q, *args, **kwargs)

  monkeypatch.setattr(decode_attention, 'cached_attention', counting)
  (_, (xla_tokens, _)), (_, (tokens, _)) = _xla_and_pallas(small_cfg, 3)
  assert seen and set(seen) <= {3, 6}  # Steps: [3 tokens | 3 slots].
  np.testing.assert_array_equal(tokens, xla_tokens)


def test_generate_takes_the_attention(small_cfg):
  cfg = dataclasses.replace(small_cfg, num_heads=2, noise_window=4)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(4))
  outs = [decode.generate(params, cfg, [[3, 4, 5]], max_new_tokens=8, k=4,
                          attention_impl=impl).tokens
          for impl in ('xla', 'pallas')]
  np.testing.assert_array_equal(outs[0], outs[1])
  with pytest.raises(ValueError, match="attention_impl='fast'"):
    decode.generate(params, cfg, [[3]], max_new_tokens=4, k=4,
                    attention_impl='fast')


def test_the_model_refuses_a_kt_cache_for_the_kernel(small_cfg):
  cfg = dataclasses.replace(small_cfg, num_heads=2, noise_window=4)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  spec = decode.DecodeSpec(model=cfg, k=4, num_steps=2, prompt_len=3,
                           key_layout='kt')
  positions, mask = layouts.decode_layout(jnp.zeros(1, jnp.int32), 0, 3, 16)
  with pytest.raises(ValueError, match="reads keys in layout 'k', not 'kt'"):
    model_lib.Transformer(cfg, 'pallas').apply(
        {'params': params}, jnp.ones((1, 3), jnp.int32), None, positions,
        mask, decode.init_cache(spec, 1, 16), 0,
        method=model_lib.Transformer.cached_step)


@pytest.mark.parametrize('backend,k,num_heads,expected', [
    ('gpu', 4, 2, 'pallas'), ('gpu', 1, 2, 'xla'), ('gpu', 4, 4, 'xla'),
    ('cpu', 4, 2, 'xla'), ('tpu', 4, 2, 'xla')])
def test_auto_attention_is_pallas_for_push_forward_steps_on_gpu(
    small_cfg, monkeypatch, backend, k, num_heads, expected):
  # num_heads=4 gives head dim 8, which the kernel does not take.
  cfg = dataclasses.replace(small_cfg, num_heads=num_heads, noise_window=4)
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  spec = decode.DecodeSpec(model=cfg, k=k, num_steps=2, prompt_len=3)
  assert decode.attention_impl(spec) == expected
  assert decode.key_layout(spec) == ('kt' if backend == 'cpu' and k > 1
                                     else 'k')
  kt = dataclasses.replace(spec, key_layout='kt')  # Forced: XLA reads it.
  assert decode.attention_impl(kt) == 'xla'
  if num_heads == 2:
    forced = dataclasses.replace(spec, attention_impl='pallas', k=4)
    assert decode.attention_impl(forced) == 'pallas'
    assert decode.key_layout(forced) == 'k'  # Also on CPU ('auto': kt).


def test_without_the_triton_backend_auto_is_xla(small_cfg, monkeypatch):
  # A jax that dropped Pallas's Triton backend: 'auto' falls back to XLA,
  # and the kernel says what is missing.
  cfg = dataclasses.replace(small_cfg, num_heads=2, noise_window=4)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(decode_attention, 'plgpu', None)
  spec = decode.DecodeSpec(model=cfg, k=4, num_steps=2, prompt_len=3)
  assert decode.attention_impl(spec) == 'xla'
  q, k, v, mask = _case(1, 2, 2, 16, 8, jnp.float32)
  with pytest.raises(RuntimeError, match='attention_impl=.xla.'):
    decode_attention.cached_attention(q, k, v, mask)


@pytest.mark.parametrize('overrides,num_heads,needle', [
    (dict(attention_impl='triton'), 2, "attention_impl='triton'"),
    (dict(attention_impl='pallas', key_layout='kt'), 2, "key_layout='kt'"),
    (dict(attention_impl='pallas'), 4, 'this model has 8'),
])
def test_bad_attention_settings_are_refused(small_cfg, overrides, num_heads,
                                            needle):
  cfg = dataclasses.replace(small_cfg, num_heads=num_heads)
  with pytest.raises(ValueError, match=needle):
    decode.DecodeSpec(model=cfg, k=1, num_steps=2, prompt_len=3, **overrides)


@pytest.mark.parametrize('where,value,needle', [
    ('settings', 'fast', "settings.attention_impl='fast'"),
    ('result', 'auto', "results.0..attention_impl='auto'"),
])
def test_bench_json_checks_the_attention(where, value, needle):
  path = os.path.join(os.path.dirname(__file__), '..', 'docs',
                      'bench_lm1b_h100_k4_pallas.json')
  with open(path) as f:
    d = json.load(f)
  bench_schema.validate_bench_json(d)  # The recorded H100 run is valid.
  assert {r['attention_impl'] for r in d['results']} == {'pallas'}
  if where == 'settings':
    d['settings']['attention_impl'] = value
  else:
    d['results'][0]['attention_impl'] = value
  with pytest.raises(ValueError, match=needle):
    bench_schema.validate_bench_json(d)


def test_bench_refuses_an_unknown_attention():
  s = bench_settings.BenchSettings(attention_impl='fast')
  with pytest.raises(ValueError, match="bench.attention_impl='fast'"):
    bench_settings.check_settings(s, seq_len=48)


@pytest.mark.parametrize('fields,num_heads,needle', [
    (dict(key_layout='kt'), 2, "key_layout='kt' for the config's model: "
     'reads keys'),
    (dict(), 4, "for the config's model: needs a head dim .* this model has "
     '8'),
])
def test_bench_refuses_a_pallas_attention_the_model_cannot_run(
    fields, num_heads, needle):
  # From the config, as the pipeline's up-front check reads it.
  config = ml_collections.ConfigDict({
      'model': {'seq_len': 48, 'd_model': 32, 'num_heads': num_heads},
      'bench': dict(fields, attention_impl='pallas')})
  with pytest.raises(ValueError, match=needle):
    bench_settings.settings_from_config(config)
  config.bench.attention_impl = 'auto'  # Falls back to XLA instead.
  assert bench_settings.settings_from_config(config).attention_impl == 'auto'


def test_bench_checks_the_models_it_loaded_before_measuring(
    tmp_path, small_cfg, monkeypatch):
  # The config allows the kernel, the workdir's model (head dim 8) not:
  # refused naming that model, before the ceilings are measured.
  config = ml_collections.ConfigDict({
      'model': {'seq_len': 48, 'd_model': 32, 'num_heads': 2},
      'bench': {'attention_impl': 'pallas'}})
  loaded = bench_models.BenchModel(
      'teacher', 'trained', dataclasses.replace(small_cfg, num_heads=4), {})
  monkeypatch.setattr(bench_models, 'load_models',
                      lambda *a: {1: loaded, 4: loaded})

  def measured(*a, **kw):
    raise AssertionError('measured the ceilings first')
  monkeypatch.setattr(bench, '_roofline_numbers', measured)
  with pytest.raises(ValueError, match='for teacher: .* this model has 8'):
    bench.run_bench(config, str(tmp_path), log=lambda line: None)
  assert not os.listdir(tmp_path)
