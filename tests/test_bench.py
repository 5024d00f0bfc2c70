"""bench: run_bench end to end on the tiny config, roofline arithmetic, schema.

No test asserts on a timing: the machine may be shared.
"""

import copy
import dataclasses
import functools
import importlib.util
import json
import os
import re
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kforcing_jax import bench
from kforcing_jax import bench_peer
from kforcing_jax import bench_report
from kforcing_jax import bench_schema
from kforcing_jax import bench_settings
from kforcing_jax import bench_timing
from kforcing_jax import config_files
from kforcing_jax import decode
from kforcing_jax import model as model_lib
from kforcing_jax import roofline
from kforcing_jax import roofline_cli
from kforcing_jax import torch_threads
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config(**bench_fields):
  spec = importlib.util.spec_from_file_location(
      'tiny_config', os.path.join(ROOT, 'configs', 'tiny.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  with config.unlocked():
    if 'bench' not in config:
      config.bench = ml_collections.ConfigDict()
    for name, value in bench_fields.items():
      config.bench[name] = value
  return config


# Small measurement sizes keep the roofline probe to a fraction of a second.
_FAST = dict(batch_sizes=(1, 2), repeats=1, warmup=1, random_weights=True,
             peer=False, matmul_size=128, copy_mib=4)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('bench'))
  lines = []
  out = bench.run_bench(_tiny_config(**_FAST), workdir, log=lines.append)
  return workdir, out, lines


def test_run_bench_writes_valid_json_and_png(tiny_run):
  workdir, out, lines = tiny_run
  with open(os.path.join(workdir, 'bench.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  on_disk = bench_schema.load_bench_json(os.path.join(workdir, 'bench.json'))
  assert on_disk['results'] == json.loads(json.dumps(out['results']))
  # k = 1 (AR) + ks (2, 3, 4), each at batch 1 and 2.
  cells = sorted((r['k'], r['batch']) for r in out['results'])
  assert cells == [(k, b) for k in (1, 2, 3, 4) for b in (1, 2)]
  for r in out['results']:
    assert r['new_tokens'] == 32 - 6  # seq_len - prefix_len.
    assert r['num_steps'] == -(-26 // r['k'])
    assert len(r['times_s']) == 1
    assert r['weights'] == 'random'
    # The achieved rates are the cost model's totals over the median time.
    assert r['achieved_flops_per_s'] == pytest.approx(
        r['model_flops'] / r['median_s'])
    assert r['achieved_bytes_per_s'] == pytest.approx(
        r['model_bytes'] / r['median_s'])
    if r['k'] == 1:
      assert r['speedup'] == 1.0
      assert r['predicted_speedup'] == pytest.approx(1.0)
    # 'auto' as asked, and resolved per cell for this backend (CPU).
    assert r['key_layout'] == ('kt' if r['k'] > 1 else 'k')
  assert out['settings']['key_layout'] == 'auto'
  # kernels.impl 'auto' decodes with full logits on CPU (projection.py).
  assert (out['settings']['kernel_impl'],
          out['settings']['kernel_impl_resolved']) == ('auto', 'reference')
  # One random student (window 4) serves every k; the teacher is separate.
  assert [(m['name'], m['serves_k'], m['noise_window'])
          for m in out['models']] == [('random_teacher', [1], 0),
                                      ('random_student', [2, 3, 4], 4)]
  assert not out['peer']['available']
  # One progress line per (model, batch) cell.
  assert sum(l.startswith('[bench]') and 'batch=' in l for l in lines) == 8
  table = lines[-2]
  assert 'meas/pred' in table and 'H100 SXM' in table and 'TPU v5e' in table


def test_accelerator_rows_cover_both_models(tiny_run):
  _, out, _ = tiny_run
  rows = out['accelerators']
  assert {(a['name'], a['model']) for a in rows} == {
      (n, m) for n in ('H100 SXM', 'TPU v5e') for m in ('lm1b', 'config')}
  for a in rows:
    # A PF step never beats k (ideal) and costs more than an AR step.
    assert 0 < a['predicted_speedup'] <= a['k'] + 1e-9


@pytest.mark.parametrize('breakage,key', [
    (lambda d: d['results'][0].pop('tokens_per_s'), r'results\[0\]\.'
     'tokens_per_s is missing'),
    (lambda d: d['machine'].update(cpu_count='two'), 'machine.cpu_count'),
    (lambda d: d['results'][3]['memory'].update(host_rss_delta_mib=None),
     r'results\[3\]\.memory\.host_rss_delta_mib'),
    (lambda d: d['roofline'].update(mode='guess'), 'roofline.mode'),
    (lambda d: d['settings'].update(key_layout='diagonal'),
     "settings.key_layout='diagonal'"),
    (lambda d: d['accelerators'][0].update(predicted_speedup=-0.5),
     r'accelerators\[0\]\.predicted_speedup must be > 0'),
    (lambda d: d['settings'].update(profile='yes'), 'settings.profile must '
     'be bool'),
    (lambda d: d['settings'].update(kernel_impl='cuda'),
     "settings.kernel_impl='cuda'"),
    (lambda d: d['results'][0].update(key_layout='auto'),
     r"results\[0\]\.key_layout='auto': expected the resolved layout"),
    (lambda d: d['results'][0].update(profile_error='x'),
     r'results\[0\] has a profile but settings.profile is not true'),
    (lambda d: d['results'].pop(), 'no row for k=4, batch=2'),
    (lambda d: d.pop('peer'), 'bench.peer is missing'),
    (lambda d: d['results'][1].update(times_s=[]), r'results\[1\]\.times_s'),
    (lambda d: d['results'][2].update(achieved_flops_per_s=-1.0),
     r'results\[2\]\.achieved_flops_per_s must be a number > 0'),
    (lambda d: d['results'][0].update(speedup=1.09),
     r'results\[0\]\.speedup=1.09 for k=1'),
    (lambda d: d['results'].append(copy.deepcopy(d['results'][1])),
     'repeats k=1, batch=2'),
])
def test_validate_rejects_broken_dicts(tiny_run, breakage, key):
  _, out, _ = tiny_run
  broken = copy.deepcopy(out)
  broken['results'].sort(key=lambda r: (r['k'], r['batch']))
  breakage(broken)
  with pytest.raises(ValueError, match=key):
    bench_schema.validate_bench_json(broken)



@pytest.mark.parametrize('name', sorted(
    n for n in os.listdir(os.path.join(ROOT, 'docs'))
    if n.startswith('bench_') and n.endswith('.json')))
def test_committed_bench_results_validate(name):
  # The README quotes these files; a schema change must keep them readable.
  with open(os.path.join(ROOT, 'docs', name)) as f:
    d = json.load(f)
  bench_schema.validate_bench_json(d)
  table = bench_report.format_tables(d)  # Renders, new columns included.
  assert len([l for l in table.splitlines() if l[:5].strip().isdigit()]) >= (
      len(d['results']))


def test_table_headings_sit_over_their_columns():
  # 'tok/s' ended 4 characters left of its numbers, and roofline mode 'sum'
  # headed two columns 'pred(sum)'.
  with open(os.path.join(ROOT, 'docs', 'bench_demo_cpu.json')) as f:
    d = json.load(f)
  cells = lambda line: list(re.finditer(r'\S+(?: \S+)*', line))
  for mode, other in (('max', 'sum'), ('sum', 'max')):
    d['roofline']['mode'] = mode
    header, *rows = bench_report.format_tables(d).splitlines()[:4]
    assert f'pred({mode})  pred({other})' in header
    names = cells(header)
    assert [m.group() for m in names][:4] == ['batch', 'k', 'model', 'tok/s']
    for row in rows:
      values = cells(row)
      assert len(values) == len(names)
      assert values[2].start() == names[2].start()  # Names: left-aligned.
      assert [m.end() for i, m in enumerate(values) if i != 2] == [
          m.end() for i, m in enumerate(names) if i != 2]
  # What the peer ran (model, weights, decoding) was left out of the table.
  assert d['peer']['available']
  assert d['peer']['note'] in bench_report.format_tables(d)


# A model small enough to cost by hand: 1 layer, width 2, vocabulary 3,
# 10 dense params, 5 noise-encoder params, 1 byte per weight and KV element.
_HAND = roofline.ModelShape(num_layers=1, d_model=2, vocab_size=3,
                         dense_params=10, noise_params=5, weight_bytes=1,
                         kv_bytes=1, dense_bytes=1)


def test_roofline_memory_bound_matches_hand_count():
  # Prompt 2, 4 new tokens. AR: prefill (2 tokens) + 3 one-token steps at
  # cache index 2, 3, 4. PF k=2: prefill (2 tokens + 2 slots) + one step.
  # Both caches are 6 slots (smaller than one cache block), and attention
  # reads all of them every pass.
  # bytes = weights (10 + 2 * (tokens + noise slots)) + KV 4 * (6 + q)
  #         + unembed (6 + 8 * 3 * emit); PF also embeds its 4 noise values
  #         once before the loop: 5 noise-encoder weights + 4 * 2 written.
  ar = (10 + 4 + 32 + 30) + 3 * (12 + 28 + 30)
  pf = (5 + 8) + 2 * (10 + 8 + 40 + 54)
  assert (ar, pf) == (286, 237)
  got = roofline.predicted_speedup(_HAND, _HAND, 1, 2, 2, 4, peak_flops=1e30,
                                bandwidth=1.0, mode='max')
  assert got == pytest.approx(ar / pf)
  assert roofline.predict_decode_time(_HAND, 1, 2, 1, 4, 1e30, 1.0) == (
      pytest.approx(ar))


def test_roofline_compute_bound_matches_hand_count():
  # FLOPs = 2*10*q + 4*2*6*emit (one layer, which is the last: only the
  # emitting rows attend) + 12*emit; PF's noise encoder runs once over its
  # 4 noise values: 2*5*4.
  ar = (40 + 48 + 12) + 3 * (20 + 48 + 12)
  pf = 40 + 2 * (80 + 96 + 24)
  got = roofline.predicted_speedup(_HAND, _HAND, 1, 2, 2, 4, peak_flops=1.0,
                                bandwidth=1e30, mode='max')
  assert got == pytest.approx(ar / pf)


def test_decode_totals_match_hand_count():
  # The two tests above, summed: AR (FLOPs, bytes) and PF k=2 (with its
  # noise encoder) for prompt 2 and 4 new tokens.
  assert roofline.decode_totals(_HAND, 1, 2, 1, 4) == (340, 286)
  assert roofline.decode_totals(_HAND, 1, 2, 2, 4) == (440, 237)
  # 'sum' mode charges every pass FLOPs / peak + bytes / bandwidth, so a
  # whole decode costs the totals at those rates.
  for k in (1, 2):
    flops, nbytes = roofline.decode_totals(_HAND, 3, 2, k, 4)
    assert roofline.predict_decode_time(_HAND, 3, 2, k, 4, 7.0, 5.0,
                                     mode='sum') == pytest.approx(
                                         flops / 7.0 + nbytes / 5.0)


def test_decode_totals_charge_each_cache_growth_once():
  # Prompt 2 + 40 AR steps: a 32-slot segment, then the full 42 slots, so
  # decode_loop copies the cache once: 1 layer x (K + V) x width 2 x 1 byte
  # x (32 read + 42 written).
  passes = roofline.decode_passes(2, 1, 40, student=False)
  assert [p.slots for p in passes[::10]] == [32, 32, 32, 42]
  pass_bytes = sum(b for p in passes
                   for _, b in roofline.pass_costs(_HAND, 1, p).values())
  assert roofline.decode_totals(_HAND, 1, 2, 1, 40)[1] == pass_bytes + 2 * 2 * (
      32 + 42)
  # A full cache from the start is never grown.
  full = roofline.predict_decode_time(_HAND, 1, 2, 1, 40, 1e30, 1.0,
                                      full_cache=True)
  assert full == pytest.approx(sum(
      b for p in passes
      for _, b in roofline.pass_costs(_HAND, 1, p, cache_size=42).values()))


def test_ar_step_bound_judges_the_middle_pass_of_the_decode():
  # Prompt 2 + 40 AR steps: the middle pass reads the 32-slot segment.
  middle = roofline.decode_passes(2, 1, 40, student=False)[20]
  flops = sum(f for f, _ in roofline.pass_costs(_HAND, 1, middle).values())
  nbytes = sum(b for _, b in roofline.pass_costs(_HAND, 1, middle).values())
  # Ceilings either side of the pass's own FLOPs-per-byte ratio.
  ratio = flops / nbytes
  assert roofline.ar_step_bound(_HAND, 1, 2, 40, ratio * 0.9, 1.0) == 'compute'
  assert roofline.ar_step_bound(_HAND, 1, 2, 40, ratio * 1.1, 1.0) == 'memory'
  # One new token: the prefill is the only pass.
  prefill = roofline.decode_passes(2, 1, 1, student=False)[0]
  costs = roofline.pass_costs(_HAND, 1, prefill).values()
  ratio = sum(f for f, _ in costs) / sum(b for _, b in costs)
  assert roofline.ar_step_bound(_HAND, 1, 2, 1, ratio * 0.9, 1.0) == 'compute'
  assert roofline.ar_step_bound(_HAND, 1, 2, 1, ratio * 1.1, 1.0) == 'memory'


def test_weight_bound_regime_gives_k():
  # When reading the weights dominates every step, each pass costs the
  # same, so the speedup is the ratio of pass counts: exactly k.
  heavy = dataclasses.replace(_HAND, dense_params=10 ** 12)
  for k in (2, 4):
    got = roofline.predicted_speedup(heavy, heavy, 1, 2, k, 8, peak_flops=1e30,
                                  bandwidth=1.0)
    assert got == pytest.approx(k, rel=1e-6)


def test_roofline_modes_are_ordered():
  shape = roofline.ModelShape.of(model_lib.ModelConfig(
      vocab_size=512, seq_len=32, num_layers=2, d_model=64, num_heads=4,
      mlp_dim=128, noise_window=4))
  p = roofline.Pass(index=10, tokens=4, noise=4, emit=4, slots=32)
  costs = roofline.pass_costs(shape, 8, p)
  t = {m: roofline.pass_time(costs, 1e10, 1e9, m) for m in roofline.MODES}
  assert t['max'] <= t['per_op'] <= t['sum']
  # Reading the whole cache costs more than reading a segment of it.
  full = roofline.pass_costs(shape, 8, p, cache_size=40)
  assert full['attention'][1] > costs['attention'][1]


@pytest.mark.parametrize('k, index', [(1, 9), (4, 14), (4, 38)])
def test_roofline_flops_of_a_step_match_xla(k, index):
  # The cost model's FLOPs of one decode step against XLA's count of the
  # compiled step. It used to charge every layer's projections, MLP and
  # attention at all 2k positions (the last block runs the k emitting
  # ones), and attention over the valid slots (it reads the segment).
  cfg = model_lib.ModelConfig(vocab_size=512, seq_len=64, num_layers=2,
                              d_model=64, num_heads=4, mlp_dim=256,
                              noise_window=4 if k > 1 else 0)  # AR teacher.
  batch, prompt_len, steps = 4, 6, 48 // k
  spec = decode.DecodeSpec(model=cfg, k=k, num_steps=steps,
                           prompt_len=prompt_len, greedy=True)
  p = next(p for p in roofline.decode_passes(prompt_len, k, steps, k > 1)
           if p.index == index)
  params = model_lib.compute_params(cfg, model_lib.abstract_params(cfg))
  state = jax.eval_shape(lambda: decode.DecodeState(
      cache=decode.init_cache(spec, batch, p.slots),
      index=jnp.int32(index), pad=jnp.zeros((batch,), jnp.int32),
      pending=jnp.zeros((batch, k), jnp.int32),
      tokens=jnp.zeros((batch, steps * k), jnp.int32), step=jnp.int32(3),
      done=jnp.zeros((batch,), bool), lengths=jnp.zeros((batch,), jnp.int32),
      counts=None))
  noise = jax.ShapeDtypeStruct((batch, k), jnp.float32)
  noise_x = (jax.ShapeDtypeStruct((batch, k, cfg.d_model), jnp.float32)
             if k > 1 else None)
  step = jax.jit(lambda params, state, u, x: decode.decode_step(
      spec, params, state, u, noise_x=x))
  analysis = step.lower(params, state, noise, noise_x).compile().cost_analysis()
  xla = (analysis[0] if isinstance(analysis, list) else analysis)['flops']
  shape = roofline.ModelShape.of(cfg)
  ours = sum(f for f, _ in roofline.pass_costs(shape, batch, p).values())
  # XLA also counts softmax, norms, RoPE and sampling; we count matmuls.
  assert ours == pytest.approx(xla, rel=0.05)  # The old model: 7-17% off.


def test_accelerator_rows_skip_lm1b_when_the_prefix_fills_it():
  # A prefix of 128+ tokens (owt's seq_len is 1024) left LM1B no new token:
  # its rows printed 0.97 for every k from a negative noise-encoder cost.
  cfg = model_lib.ModelConfig(vocab_size=61, seq_len=256, num_layers=1,
                              d_model=16, num_heads=2, mlp_dim=32)
  rows = roofline.accelerator_predictions(cfg, [1], [2], 130, 100)
  assert {r['model'] for r in rows} == {'config'}
  assert all(r['predicted_speedup'] > 1 for r in rows)
  rows = roofline.accelerator_predictions(cfg, [1], [2], 6, 100)
  assert {r['model'] for r in rows} == {'config', 'lm1b'}


def test_emit_params_are_the_last_blocks_emitting_part():
  cfg = model_lib.ModelConfig(vocab_size=61, seq_len=16, num_layers=2,
                              d_model=32, num_heads=4, mlp_dim=64)
  params = jax.eval_shape(functools.partial(model_lib.init_params, cfg),
                          jax.random.PRNGKey(0))
  last = params['block_1']
  emitting = [last['attn']['query'], last['attn']['out'], last['mlp_in'],
              last['mlp_out'], last['mlp_norm'], params['final_norm']]
  assert roofline.emit_params(cfg) == sum(map(model_lib.count_params,
                                              emitting))


def test_dense_and_noise_param_counts_match_the_param_tree():
  cfg = model_lib.ModelConfig(vocab_size=61, seq_len=16, num_layers=2,
                              d_model=32, num_heads=4, mlp_dim=64,
                              noise_window=2)
  # Shapes are enough to count parameters.
  params = jax.eval_shape(functools.partial(model_lib.init_params, cfg),
                          jax.random.PRNGKey(0))
  outside = ('embed', 'unembed', 'noise_encoder')
  dense = sum(model_lib.count_params(v) for n, v in params.items()
              if n not in outside)
  assert roofline.dense_params(cfg) == dense
  assert roofline.ModelShape.of(cfg).noise_params == model_lib.count_params(
      params['noise_encoder'])


def test_model_shape_charges_the_bytes_the_decode_loop_reads():
  # Stored float32; in bfloat16, decode_loop casts the blocks' projection
  # kernels and MLP biases once (model.compute_params): 2 bytes each. Norms,
  # embedding, unembedding and noise encoder are read as stored: 4 bytes.
  d, m, layers = 32, 64, 2
  cfg = model_lib.ModelConfig(vocab_size=61, seq_len=16, num_layers=layers,
                              d_model=d, num_heads=4, mlp_dim=m,
                              noise_window=2, dtype='bfloat16')
  cast = layers * (4 * d * d + 2 * d * m + m + d)
  norms = layers * 4 * d + 2 * d
  bf16 = roofline.ModelShape.of(cfg)
  assert bf16.dense_params == cast + norms
  assert bf16.dense_bytes == pytest.approx((2 * cast + 4 * norms)
                                           / (cast + norms))
  assert (bf16.weight_bytes, bf16.kv_bytes) == (4, 2)
  f32 = roofline.ModelShape.of(dataclasses.replace(cfg, dtype='float32'))
  assert (f32.dense_bytes, f32.weight_bytes, f32.kv_bytes) == (4, 4, 4)
  # The weights part of a pass charges dense_bytes, not weight_bytes.
  p = roofline.Pass(index=0, tokens=1, noise=0, emit=1, slots=32)
  rows = d * 4  # One embedding row, float32.
  assert roofline.pass_costs(bf16, 1, p)['weights'][1] == pytest.approx(
      bf16.dense_params * bf16.dense_bytes + rows)
  # The cast itself, once per decode: reads 4 and writes 2 bytes per cast
  # weight, for AR and push-forward decodes alike; nothing in float32.
  assert bf16.cast_bytes == 6 * cast and f32.cast_bytes == 0
  uncast = dataclasses.replace(bf16, cast_bytes=0.0)
  for k in (1, 2):
    with_cast = roofline.decode_totals(bf16, 3, 2, k, 4)
    without = roofline.decode_totals(uncast, 3, 2, k, 4)
    assert with_cast[0] == without[0]
    assert with_cast[1] - without[1] == pytest.approx(6 * cast)
    assert roofline.predict_decode_time(bf16, 3, 2, k, 4, 1e30, 1.0) == (
        pytest.approx(roofline.predict_decode_time(uncast, 3, 2, k, 4, 1e30,
                                                1.0) + 6 * cast))
  # Real parameters give the same as their traced shapes.
  params = model_lib.init_params(cfg, jax.random.PRNGKey(1))
  assert roofline.ModelShape.of(cfg, params) == bf16


def test_settings_defaults_and_errors():
  config = _tiny_config()
  s = bench_settings.settings_from_config(config)
  assert s.batch_sizes == (1, 8, 64, 256) and s.ks == (2, 3, 4)
  assert s.prefix_len == 6 and s.repeats == 5 and s.warmup == 1
  no_section = _tiny_config()
  with no_section.unlocked():
    del no_section['bench']
  assert bench_settings.settings_from_config(no_section) == s
  with pytest.raises(ValueError, match='unknown bench field'):
    bench_settings.settings_from_config(_tiny_config(batch_size=3))
  with pytest.raises(ValueError, match='bench.ks'):
    bench_settings.settings_from_config(_tiny_config(ks=(1, 2)))
  with pytest.raises(ValueError, match='bench.roofline'):
    bench_settings.settings_from_config(_tiny_config(roofline='guess'))
  # Each of these used to pass, then fail after (or crash during) timing.
  for fields, needle in (
      (dict(ks=()), r'bench.ks=\(\): need student k values >= 2'),
      (dict(max_new_tokens=1000),
       r'bench.prefix_len \+ max_new_tokens = 1006 > model.seq_len=32'),
      (dict(max_new_tokens=-5), 'bench.max_new_tokens=-5 must be >= 0'),
      (dict(copy_mib=0), 'bench.copy_mib=0 must be >= 1'),
      (dict(matmul_size=0), 'bench.matmul_size=0 must be >= 1'),
      (dict(peak_flops=-1.0), 'bench.peak_flops=-1.0 must be >= 0'),
      (dict(batch_sizes=(1.5, 8.9)), 'bench.batch_sizes=.*need a tuple of '
       'ints'),
      # A repeated batch size was timed twice, its first speedups divided
      # by the second's AR time.
      (dict(batch_sizes=(4, 1, 4)),
       r'bench.batch_sizes=\(4, 1, 4\): each value once'),
      (dict(ks=(3, 4, 4)), r'bench.ks=\(3, 4, 4\): each value once'),
  ):
    with pytest.raises(ValueError, match=needle):
      bench_settings.settings_from_config(_tiny_config(**fields))
  with pytest.raises(ValueError, match="bench.key_layout='ks'"):
    bench_settings.settings_from_config(_tiny_config(key_layout='ks'))
  with pytest.raises(ValueError, match='no room'):
    bench_settings.settings_from_config(_tiny_config(prefix_len=32))


def test_table_shows_each_cells_compiled_peak(tiny_run):
  _, out, _ = tiny_run
  d = copy.deepcopy(out)
  d['results'].sort(key=lambda r: (r['batch'], r['k']))
  d['results'][0]['memory']['compiled'] = None  # A backend without it.
  rows = [l.split() for l in bench_report.format_tables(d).splitlines()[1:]]
  for r, row in zip(d['results'], rows):
    assert row[:2] == [str(r['batch']), str(r['k'])]
    c = r['memory']['compiled']
    if c is None:
      assert row[-1] == '-'
      continue
    total = (c['argument_size_in_bytes'] + c['output_size_in_bytes']
             - c['alias_size_in_bytes'] + c['temp_size_in_bytes'])
    assert row[-1] == f'{total / 2 ** 20:.1f}'
  assert rows[0][-1] == '-' and rows[1][-1] != '-'


@pytest.mark.parametrize('given', [{'peak_flops': 1e9}, {'bandwidth': 2e9},
                                   {'peak_flops': 1e9, 'bandwidth': 2e9}])
def test_a_given_ceiling_is_recorded_and_said_as_given(given, monkeypatch):
  # One given ceiling used to mark both "measured", in bench.json and in
  # the log, with the other one measured beside it.
  monkeypatch.setattr(roofline, 'measure_peak_flops', lambda *a: 3e9)
  monkeypatch.setattr(roofline, 'measure_bandwidth',
                      lambda *a, **kw: (4e9, 1024))
  said = []
  roof = bench._roofline_numbers(  # pylint: disable=protected-access
      bench_settings.BenchSettings(**given),
      types.SimpleNamespace(compute_dtype='float32'), said.append)
  assert roof['peak_flops'] == given.get('peak_flops', 3e9)
  assert roof['bandwidth'] == given.get('bandwidth', 4e9)
  assert roof['peak_flops_measured'] == ('peak_flops' not in given)
  assert roof['bandwidth_measured'] == ('bandwidth' not in given)
  assert roof['measured'] is False
  [line] = said
  assert ('GFLOP/s (given)' in line) == ('peak_flops' in given)
  assert ('GB/s (given)' in line) == ('bandwidth' in given)
  with open(os.path.join(ROOT, 'docs', 'bench_demo_cpu.json')) as f:
    d = json.load(f)
  d['roofline'] = roof
  bench_schema.validate_bench_json(d)
  table = bench_report.format_tables(d)
  assert 'measured ceilings' not in table
  peak_how = 'given' if 'peak_flops' in given else 'measured'
  bw_how = 'given' if 'bandwidth' in given else 'measured'
  assert (f'ceilings {roof["peak_flops"] / 1e9:.1f} GFLOP/s ({peak_how}) and '
          f'{roof["bandwidth"] / 1e9:.1f} GB/s ({bw_how})') in table


def test_bench_decodes_with_the_configured_projection(tmp_path,
                                                      monkeypatch):
  # kernels.impl (not a bench field) picks the decode loop's vocabulary
  # projection, as for generate and evaluate, and bench.json records it.
  config = _tiny_config(**dict(_FAST, batch_sizes=(1,), ks=(2,)))
  config.kernels.impl = 'chunked'
  specs = []
  real_spec = bench_timing.decode.DecodeSpec

  def spec(**kwargs):
    specs.append(kwargs.get('kernel_impl'))
    return real_spec(**kwargs)

  monkeypatch.setattr(bench_timing.decode, 'DecodeSpec', spec)
  out = bench.run_bench(config, str(tmp_path), log=lambda _: None)
  assert out['settings']['kernel_impl'] == 'chunked'
  assert out['settings']['kernel_impl_resolved'] == 'chunked'
  assert specs and set(specs) == {'chunked'}
  s = bench_settings.settings_from_config(_tiny_config())
  assert s.kernel_impl == 'auto'
  with pytest.raises(ValueError, match="unknown bench field.*kernel_impl"):
    bench_settings.settings_from_config(_tiny_config(kernel_impl='chunked'))


@pytest.mark.parametrize('readout', ['sample', 'median'])
def test_bench_readout_samples_the_teacher_and_the_students(tmp_path,
                                                              monkeypatch,
                                                              readout):
  # bench.readout='sample' or 'median': the AR teacher samples by inverse
  # CDF (not greedy) and the students read out that way, so both pay for it.
  config = _tiny_config(**dict(_FAST, batch_sizes=(1,), ks=(2,),
                               readout=readout))
  specs = []
  real_spec = bench_timing.decode.DecodeSpec

  def spec(**kwargs):
    made = real_spec(**kwargs)
    specs.append((made.k, made.greedy, made.readout))
    return made

  monkeypatch.setattr(bench_timing.decode, 'DecodeSpec', spec)
  out = bench.run_bench(config, str(tmp_path), log=lambda _: None)
  assert sorted(specs) == [(1, False, 'argmax'), (2, False, readout)]
  assert out['settings']['readout'] == readout
  bench_schema.validate_bench_json(out)
  assert f'(bench.readout={readout}: the AR teacher samples' in (
      bench_report.format_tables(out))
  del out['settings']['readout']  # Files from before it: argmax, unsaid.
  assert 'bench.readout' not in bench_report.format_tables(out)
  out['settings']['readout'] = 'nucleus'
  with pytest.raises(ValueError, match="settings.readout='nucleus' not in"):
    bench_schema.validate_bench_json(out)
  with pytest.raises(ValueError, match="bench.readout='top_k'; expected one"):
    bench_settings.settings_from_config(_tiny_config(readout='top_k'))


def test_random_weight_fallback_is_announced(tmp_path):
  # No trained runs in the workdir: every model falls back to random
  # weights, which the log must say (the rows alone say '(random)').
  fields = dict(_FAST, random_weights=False, batch_sizes=(1,), ks=(2,))
  lines = []
  out = bench.run_bench(_tiny_config(**fields), str(tmp_path),
                        log=lines.append)
  assert {r['weights'] for r in out['results']} == {'random'}
  notes = [l for l in lines if 'NOTE: no trained run' in l]
  assert len(notes) == 1 and 'serves k=[1, 2]' in notes[0]
  quiet = []
  bench.run_bench(_tiny_config(**dict(fields, random_weights=True)),
                  str(tmp_path / 'q'), log=quiet.append)
  assert not any('NOTE: no trained run' in l for l in quiet)


def test_peer_times_hf_gpt2_when_installed():
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  cfg = model_lib.ModelConfig(vocab_size=64, seq_len=16, num_layers=1,
                              d_model=32, num_heads=4, mlp_dim=64)
  prompts = {2: np.ones((2, 4), np.int32)}
  s = bench_settings.BenchSettings(repeats=1, warmup=1)
  import torch  # pylint: disable=g-import-not-at-top
  before = torch.get_num_threads()
  torch.set_num_threads(1)  # The caller's count, given back after.
  try:
    out = bench_peer.run_peer(cfg, prompts, 12, s, log=lambda _: None)
    assert torch.get_num_threads() == 1
  finally:
    torch.set_num_threads(before)
  threads = torch_threads.usable_cpu_count()
  assert out['library'].endswith(f', {threads} threads')
  assert out['available'] and out['library'].startswith('torch')
  assert [p['batch'] for p in out['results']] == [2]
  assert out['results'][0]['tokens_per_s'] > 0
  assert 'greedy generate' in out['note']
  # bench.readout='sample': the peer samples too, like for like with AR.
  calls = []
  import transformers  # pylint: disable=g-import-not-at-top
  real = transformers.GPT2LMHeadModel.generate

  def generate(self, *args, **kwargs):
    calls.append(kwargs.get('do_sample'))
    return real(self, *args, **kwargs)

  transformers.GPT2LMHeadModel.generate = generate
  try:
    out = bench_peer.run_peer(cfg, prompts, 12, dataclasses.replace(
        s, readout='sample'), log=lambda _: None)
  finally:
    transformers.GPT2LMHeadModel.generate = real
  assert set(calls) == {True} and 'sampling generate' in out['note']


def test_time_batch_rewarms_every_cell_then_interleaves(monkeypatch):
  # Cells compile one after another; each runs once more, untimed, after all
  # have compiled, then the timed repeats go round-robin over k.
  events = []

  class FakeCell:

    def __init__(self, k):
      self.k = k

    def run(self):
      events.append(('untimed', self.k))

    def run_once(self):
      events.append(('timed', self.k))

  monkeypatch.setattr(bench_timing, 'prepare_cell',
                      lambda m, k, *args: FakeCell(k))
  s = bench_settings.BenchSettings(repeats=2)
  cells = bench_timing.time_batch({4: None, 1: None, 2: None}, None, 8, s)
  assert [c.k for c in cells] == [1, 2, 4]
  assert events == [('untimed', 1), ('untimed', 2), ('untimed', 4),
                    ('timed', 1), ('timed', 2), ('timed', 4),
                    ('timed', 1), ('timed', 2), ('timed', 4)]


def test_only_process_0_writes_results(tmp_path, monkeypatch):
  monkeypatch.setattr(bench.sharding, 'is_main_process', lambda: False)
  out = bench.run_bench(_tiny_config(**dict(_FAST, batch_sizes=(1,),
                                            ks=(2,))),
                        str(tmp_path), log=lambda line: None)
  assert out['results']
  assert not {'bench.json', 'bench.png'} & set(os.listdir(tmp_path))


def test_the_plot_is_written_before_bench_json(tmp_path, monkeypatch):
  # bench.json marks the stage done: a kill between the two files left a
  # re-run with numbers and no plot (or an older plot).
  written = []
  real = bench.files.atomic_write

  def record(path, write_fn):
    real(path, write_fn)
    written.append(os.path.basename(path))

  monkeypatch.setattr(bench.files, 'atomic_write', record)
  bench.run_bench(_tiny_config(**dict(_FAST, batch_sizes=(1,), ks=(2,))),
                  str(tmp_path), log=lambda line: None)
  assert written == ['bench.png', 'bench.json']
  assert sorted(n for n in os.listdir(tmp_path) if n.startswith('bench')) == [
      'bench.json', 'bench.png']


def test_runnable_others_reads_the_running_count(tmp_path):
  path = tmp_path / 'loadavg'
  path.write_text('0.50 0.40 0.30 3/200 1234\n')  # 3 running, one is us.
  assert bench.runnable_others(3, 0.0, str(path)) == 2.0
  assert bench.runnable_others(1, 0.0, str(tmp_path / 'missing')) is None
  path.write_text('garbage\n')
  assert bench.runnable_others(1, 0.0, str(path)) is None


@pytest.mark.parametrize('others,loadavg,warns', [
    (0.0, 9.0, False),  # A high average from our own earlier stage: quiet.
    (2.0, 0.0, False),  # Half the 4 cores: still quiet.
    (3.0, 0.0, True),  # Other work runnable now, on more than half.
    (None, 9.0, True),  # No /proc: the 1-minute average decides.
    (None, 2.0, False),
])
def test_busy_warning_asks_what_else_runs_now(tmp_path, monkeypatch, others,
                                              loadavg, warns):
  # 4 cores whatever this machine has (peer=False: no torch threads).
  monkeypatch.setattr(bench.torch_threads, 'usable_cpu_count', lambda: 4)
  monkeypatch.setattr(bench, 'runnable_others', lambda: others)
  monkeypatch.setattr(bench.os, 'getloadavg',
                      lambda: (loadavg, loadavg, loadavg))
  lines = []
  bench.run_bench(_tiny_config(**dict(_FAST, batch_sizes=(1,), ks=(2,))),
                  str(tmp_path), log=lines.append)
  assert any('WARNING' in l and 'busy' in l and 'on 4 cores' in l
             for l in lines) == warns


def test_an_unwritable_workdir_is_refused_before_timing(tmp_path,
                                                      monkeypatch):
  # On a read-only mount bench timed every cell, then failed writing.
  helpers.read_only(monkeypatch, tmp_path)
  monkeypatch.setattr(bench.bench_models, 'load_models',
                      helpers.must_not_run)
  with pytest.raises(ValueError, match=f'{tmp_path} is not writable '
                     r'\(Read-only file system\): bench writes bench.json'):
    bench.run_bench(_tiny_config(**_FAST), str(tmp_path))


def test_profile_traces_each_cell_once_more(tmp_path, tiny_run,
                                            monkeypatch):
  # The k=2 cell's tracing fails (as when another trace is running): its
  # timings must still land in bench.json, with the error instead.
  real = bench.step_profile.profile_run

  def profile_run(run, trace_dir, steps):
    if '_k2_' in trace_dir:
      raise RuntimeError('Profile has already been started')
    return real(run, trace_dir, steps)
  monkeypatch.setattr(bench.step_profile, 'profile_run', profile_run)
  lines = []
  out = bench.run_bench(_tiny_config(**dict(_FAST, batch_sizes=(1,),
                                            ks=(2,), profile=True)),
                        str(tmp_path), log=lines.append)
  assert out['settings']['profile'] is True
  failed = [r for r in out['results'] if r['k'] == 2]
  assert [r['profile_error'] for r in failed] == [
      'RuntimeError: Profile has already been started']
  assert 'profile' not in failed[0] and failed[0]['tokens_per_s'] > 0
  assert any('WARNING: profiling' in l and 'timings stand' in l
             for l in lines)
  for r in out['results']:
    if r['k'] == 2:
      continue
    p = r['profile']
    assert p['source'] == 'host' and p['steps'] == r['num_steps']
    assert p['ops_per_step'] > 0 and p['kinds']
    assert p['trace_dir'] == os.path.join(
        str(tmp_path), 'profile', f'{r["model"]}_k{r["k"]}_b1')
    assert os.path.isdir(p['trace_dir'])
  assert any(line.startswith('profile, batch 1') for line in lines)
  # The profile round-trips through bench.json's schema check.
  bench_schema.load_bench_json(os.path.join(str(tmp_path), 'bench.json'))
  i = next(i for i, r in enumerate(out['results']) if 'profile' in r)
  for breakage, needle in (
      (lambda r: r['profile']['kinds'][0].pop('us_per_step'),
       'profile.kinds.0..us_per_step is missing'),
      (lambda r: r['profile'].update(source='gpu'),
       "profile.source='gpu' not in"),
      (lambda r: r['profile'].update(steps=r['num_steps'] + 1),
       'profile.steps=.* but num_steps='),
      (lambda r: r['profile']['kinds'][0].update(per_step=-1.0),
       'profile.kinds.0..per_step=-1.0 must be >= 0'),
      (lambda r: r.pop('profile'),
       'has no profile .nor profile_error. though settings.profile is true'),
  ):
    broken = copy.deepcopy(out)
    breakage(broken['results'][i])
    with pytest.raises(ValueError, match=rf'results\[{i}\].*{needle}'):
      bench_schema.validate_bench_json(broken)
  # Off by default: no profile in the default run.
  assert not any('profile' in r for r in tiny_run[1]['results'])


def test_roofline_cli_predicts_a_recorded_run_again(capsys):
  # The committed demo run, predicted with the current cost model from its
  # own ceilings and settings, next to its measured speedups.
  path = os.path.join(os.path.dirname(__file__), '..', 'docs',
                      'bench_demo_cpu.json')
  demo = os.path.join(os.path.dirname(__file__), '..', 'configs', 'demo.py')
  assert roofline_cli.main([f'--config={demo}', f'--bench_json={path}']) == 0
  lines = capsys.readouterr().out.splitlines()
  d = bench_schema.load_bench_json(path)
  cfg = model_lib.ModelConfig.from_config(
      config_files.load_config(demo).model)
  want = roofline.predictions(
      roofline.ModelShape.of(cfg),
      roofline.ModelShape.of(dataclasses.replace(cfg, noise_window=4)), 8, 4,
      6, 122, d['roofline']['peak_flops'], d['roofline']['bandwidth'])
  row = next(l.split() for l in lines if l.split()[:2] == ['8', '4'])
  speedup = next(r['speedup'] for r in d['results']
                 if (r['batch'], r['k']) == (8, 4))
  assert [float(v) for v in row[2:]] == pytest.approx(
      [want['max'], want['sum'], want['per_op'], want['full_cache'], speedup,
       speedup / want['max']], abs=0.006)
  # Another config than the run's is named, not predicted.
  lm1b = os.path.join(os.path.dirname(__file__), '..', 'configs', 'lm1b.py')
  assert roofline_cli.main([f'--config={lm1b}', f'--bench_json={path}']) == 2
  assert "model 'teacher' has 5,252,608 parameters" in capsys.readouterr().err


def test_roofline_cli_for_given_ceilings(capsys):
  tiny = os.path.join(os.path.dirname(__file__), '..', 'configs', 'tiny.py')
  assert roofline_cli.main([f'--config={tiny}', '--peak_flops=1e12',
                            '--bandwidth=1e11', '--batch_sizes=1,8',
                            '--ks=2']) == 0
  out = capsys.readouterr().out.splitlines()
  assert [l.split()[:2] for l in out[2:]] == [['1', '2'], ['8', '2']]
  assert roofline_cli.main([f'--config={tiny}']) == 2
  assert 'give --peak_flops and --bandwidth' in capsys.readouterr().err
  assert roofline_cli.main([f'--config={tiny}', '--peak_flops=1e12',
                            '--bandwidth=1e11', '--max_new_tokens=-3']) == 2
  assert 'max_new_tokens=-3 must fit' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    roofline_cli.main([f'--config={tiny}', '--peak_flops=-1',
                       '--bandwidth=1'])
  assert "'-1' must be > 0" in capsys.readouterr().err
