"""The bench.json schema and its check.

bench.json, as `bench.run_bench` writes it (schema_version 1;
`validate_bench_json` checks it):
  schema_version  int, 1.
  config_name     str, config.name.
  created_unix    float, time.time() at the end of the run.
  machine         {platform, python, cpu_model, cpu_count, jax_version,
                   backend, device_kind, device_count, load_avg_start,
                   load_avg_end ([1, 5, 15]-minute load averages)}.
  settings        {batch_sizes, ks, prefix_len, max_new_tokens, repeats,
                   warmup, prompts, random_weights, peer, roofline, seed,
                   key_layout (as asked: 'auto', 'k' or 'kt'), profile
                   (bool), kernel_impl (kernels.impl of the decode loop's
                   vocabulary projection) and kernel_impl_resolved (what
                   'auto' stood for on this backend), attention_impl (as
                   asked: 'auto', 'xla' or 'pallas'), readout ('argmax',
                   'sample' or 'median': bench.readout) (these six
                   optional: files written before them lack them)}.
  models          [{name, weights ('trained'|'random'), noise_window,
                   num_params, serves_k [int]}].
  roofline        {peak_flops (FLOP/s), peak_flops_dtype, matmul_size,
                   bandwidth (bytes/s, in-place copy), bandwidth_fresh_alloc
                   (bytes/s into new buffers, or null), copy_bytes,
                   measured (bool: both ceilings measured, neither given
                   by bench.peak_flops / bench.bandwidth), mode
                   ('max'|'sum'|'per_op'), peak_flops_measured and
                   bandwidth_measured (optional bools, each ceiling on
                   its own; files written before them lack them; when the
                   peak is given, peak_flops_dtype and matmul_size describe
                   no matmul that ran)}.
  results         one per (k, batch): {model, weights, k, batch, new_tokens
                   (useful tokens per row), num_steps, lower_s, compile_s,
                   times_s [float], median_s, tokens_per_s, speedup (over AR
                   at the same batch; 1 for k=1), predicted_speedup (in
                   `roofline.mode`), predicted_speedup_modes {max, sum,
                   per_op, full_cache}, measured_over_predicted,
                   model_flops and model_bytes (the whole decode under the
                   roofline's cost model), achieved_flops_per_s and
                   achieved_bytes_per_s (those over median_s: how near the
                   measured peak and bandwidth each cell ran; these four
                   are optional, files written before them lack them),
                   key_layout (optional: the layout the cell decoded
                   with, 'k' or 'kt', once 'auto' is resolved for this
                   backend by decode.key_layout), attention_impl
                   (optional: 'xla' or 'pallas', as decode.attention_impl
                   resolved it),
                   profile (with bench.profile=True only: {source ('device'
                   or 'host'), steps (= num_steps), ops_per_step,
                   busy_us_per_step, kinds [{kind, per_step,
                   us_per_step}], trace_dir}; see step_profile.py; a cell
                   whose tracing failed has profile_error (str) instead),
                   memory {host_rss_delta_mib, host_maxrss_mib,
                   device_peak_bytes (null on CPU; the device allocator's
                   high-water mark of the whole process so far, so not
                   per cell), compiled (dict of memory_analysis() byte
                   counts, or null: the per-cell figure; the table's
                   `peak MiB` is argument + output - alias + temp)}}.
                   full_cache: the 'max' prediction when attention reads the
                   whole preallocated cache every step (decode.py with
                   DecodeSpec.cache_block=0; by default it grows the cache
                   in blocks of 32 slots, and the other modes charge each
                   pass the segment it reads).
  accelerators    [{name, model ('lm1b'|'config'), peak_flops, bandwidth,
                   batch, k, predicted_speedup, ar_step_bound
                   ('compute'|'memory')}] from datasheet numbers, bf16.
  peer            {available (bool), note (str), library (str), results:
                   [{batch, tokens_per_s, median_s, times_s,
                   ours_ar_over_peer, ours_pf_over_peer, pf_k}]}.
  checkpoints     optional (files written before it lack it): {RUN:
                   {step, run_id (optional)}}, every run in the workdir
                   then, at its latest checkpoint.
"""

import json
import math
from typing import Any

from kforcing_jax import checkpoints
from kforcing_jax import decode
from kforcing_jax import model as model_lib
from kforcing_jax import projection
from kforcing_jax import roofline

SCHEMA_VERSION = 1

_NUM = 'number'
_OPT_NUM = 'number or null'
_OPT_DICT = 'object or null'


def _is(value, kind) -> bool:
  if kind == _NUM:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)
  if kind == _OPT_NUM:
    return value is None or _is(value, _NUM)
  if kind == _OPT_DICT:
    return value is None or isinstance(value, dict)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, kind)


_TOP = {'schema_version': int, 'config_name': str, 'created_unix': _NUM,
        'machine': dict, 'settings': dict, 'models': list, 'roofline': dict,
        'results': list, 'accelerators': list, 'peer': dict}
_MACHINE = {'platform': str, 'python': str, 'cpu_model': str,
            'cpu_count': int, 'jax_version': str, 'backend': str,
            'device_kind': str, 'device_count': int, 'load_avg_start': list,
            'load_avg_end': list}
_SETTINGS = {'batch_sizes': list, 'ks': list, 'prefix_len': int,
             'max_new_tokens': int, 'repeats': int, 'warmup': int,
             'prompts': str, 'random_weights': bool, 'peer': bool,
             'roofline': str, 'seed': int}
# Added after schema_version 1 files were written: checked when present.
_SETTINGS_OPTIONAL = {'key_layout': str, 'profile': bool, 'kernel_impl': str,
                      'kernel_impl_resolved': str, 'attention_impl': str,
                      'readout': str}
_MODEL = {'name': str, 'weights': str, 'noise_window': int,
          'num_params': int, 'serves_k': list}
_ROOFLINE = {'peak_flops': _NUM, 'peak_flops_dtype': str, 'matmul_size': int,
             'bandwidth': _NUM, 'bandwidth_fresh_alloc': _OPT_NUM,
             'copy_bytes': int, 'measured': bool,
             'mode': str}
# Added after schema_version 1 files were written: checked when present.
_ROOFLINE_OPTIONAL = {'peak_flops_measured': bool, 'bandwidth_measured': bool}
_RESULT = {'model': str, 'weights': str, 'k': int, 'batch': int,
           'new_tokens': int, 'num_steps': int, 'lower_s': _NUM,
           'compile_s': _NUM, 'times_s': list, 'median_s': _NUM,
           'tokens_per_s': _NUM, 'speedup': _NUM, 'predicted_speedup': _NUM,
           'predicted_speedup_modes': dict, 'measured_over_predicted': _NUM,
           'memory': dict}
# Added after schema_version 1 files were written: checked when present.
_RESULT_OPTIONAL = ('model_flops', 'model_bytes', 'achieved_flops_per_s',
                    'achieved_bytes_per_s')
_RESULT_OPTIONAL_FIELDS = {'key_layout': str, 'attention_impl': str,
                           'profile_error': str}
_PROFILE = {'source': str, 'steps': int, 'ops_per_step': _NUM,
            'busy_us_per_step': _NUM, 'kinds': list, 'trace_dir': str}
_PROFILE_KIND = {'kind': str, 'per_step': _NUM, 'us_per_step': _NUM}
_MEMORY = {'host_rss_delta_mib': _NUM, 'host_maxrss_mib': _NUM,
           'device_peak_bytes': _OPT_NUM, 'compiled': _OPT_DICT}
_ACCEL = {'name': str, 'model': str, 'peak_flops': _NUM, 'bandwidth': _NUM,
          'batch': int, 'k': int, 'predicted_speedup': _NUM,
          'ar_step_bound': str}
_PEER = {'available': bool, 'note': str, 'library': str, 'results': list}
_PEER_RESULT = {'batch': int, 'tokens_per_s': _NUM, 'median_s': _NUM,
                'times_s': list, 'ours_ar_over_peer': _NUM,
                'ours_pf_over_peer': _NUM, 'pf_k': int}


def _check_fields(obj, spec: dict, where: str) -> None:
  if not isinstance(obj, dict):
    raise ValueError(f'bench.json: {where} must be an object, got '
                     f'{type(obj).__name__}')
  for key, kind in spec.items():
    if key not in obj:
      raise ValueError(f'bench.json: {where}.{key} is missing')
    if not _is(obj[key], kind):
      name = kind if isinstance(kind, str) else kind.__name__
      raise ValueError(f'bench.json: {where}.{key} must be {name}, got '
                       f'{obj[key]!r}')


def _check_optional(obj: dict, spec: dict, where: str) -> None:
  _check_fields(obj, {k: v for k, v in spec.items() if k in obj}, where)


def _check_profile(r: dict, profiled: bool, where: str) -> None:
  """A result's profile: there iff bench.profile (or its error instead),
  per-step figures of this result's own steps."""
  has = 'profile' in r or 'profile_error' in r
  if has != profiled:
    raise ValueError(f'bench.json: {where} ' + (
        'has a profile but settings.profile is not true' if has else
        'has no profile (nor profile_error) though settings.profile is '
        'true'))
  if 'profile' not in r:
    return
  p = r['profile']
  _check_fields(p, _PROFILE, f'{where}.profile')
  if p['source'] not in ('device', 'host'):
    raise ValueError(f'bench.json: {where}.profile.source={p["source"]!r} '
                     "not in ('device', 'host')")
  if p['steps'] != r['num_steps']:
    raise ValueError(f'bench.json: {where}.profile.steps={p["steps"]} but '
                     f'num_steps={r["num_steps"]}')
  rows = [(f'{where}.profile', p, ('ops_per_step', 'busy_us_per_step'))]
  for j, kind in enumerate(p['kinds']):
    _check_fields(kind, _PROFILE_KIND, f'{where}.profile.kinds[{j}]')
    rows.append((f'{where}.profile.kinds[{j}]', kind,
                 ('per_step', 'us_per_step')))
  for name, obj, keys in rows:
    for key in keys:
      if obj[key] < 0:
        raise ValueError(f'bench.json: {name}.{key}={obj[key]!r} must be '
                         '>= 0')


def validate_bench_json(d: dict[str, Any]) -> None:
  """Checks the bench.json schema; raises ValueError naming the bad key."""
  _check_fields(d, _TOP, 'bench')
  if 'checkpoints' in d:
    checkpoints.check_records(d['checkpoints'], 'bench.json')
  if d['schema_version'] != SCHEMA_VERSION:
    raise ValueError(f'bench.json: bench.schema_version is '
                     f'{d["schema_version"]}, expected {SCHEMA_VERSION}')
  _check_fields(d['machine'], _MACHINE, 'machine')
  _check_fields(d['settings'], _SETTINGS, 'settings')
  _check_optional(d['settings'], _SETTINGS_OPTIONAL, 'settings')
  layout = d['settings'].get('key_layout', 'auto')
  if layout not in decode.KEY_LAYOUTS:
    raise ValueError(f'bench.json: settings.key_layout={layout!r} not in '
                     f'{decode.KEY_LAYOUTS}')
  readout = d['settings'].get('readout', 'argmax')
  if readout not in decode.READOUTS:
    raise ValueError(f'bench.json: settings.readout={readout!r} not in '
                     f'{decode.READOUTS}')
  attention = d['settings'].get('attention_impl', 'auto')
  if attention not in decode.ATTENTION_IMPLS:
    raise ValueError(f'bench.json: settings.attention_impl={attention!r} not '
                     f'in {decode.ATTENTION_IMPLS}')
  for key in ('kernel_impl', 'kernel_impl_resolved'):
    impl = d['settings'].get(key, 'auto')
    if impl not in projection.IMPLS:
      raise ValueError(f'bench.json: settings.{key}={impl!r} not in '
                       f'{projection.IMPLS}')
  profiled = d['settings'].get('profile', False)
  _check_fields(d['roofline'], _ROOFLINE, 'roofline')
  _check_optional(d['roofline'], _ROOFLINE_OPTIONAL, 'roofline')
  if d['roofline']['mode'] not in roofline.MODES:
    raise ValueError(f'bench.json: roofline.mode={d["roofline"]["mode"]!r} '
                     f'not in {roofline.MODES}')
  for key in ('peak_flops', 'bandwidth'):
    if d['roofline'][key] <= 0:
      raise ValueError(f'bench.json: roofline.{key} must be > 0')
  for i, m in enumerate(d['models']):
    _check_fields(m, _MODEL, f'models[{i}]')
  seen = set()
  for i, r in enumerate(d['results']):
    where = f'results[{i}]'
    _check_fields(r, _RESULT, where)
    _check_fields(r['memory'], _MEMORY, f'{where}.memory')
    _check_fields(r['predicted_speedup_modes'],
                  {m: _NUM for m in (*roofline.MODES, 'full_cache')},
                  f'{where}.predicted_speedup_modes')
    if not r['times_s'] or not all(_is(t, _NUM) and t > 0
                                   for t in r['times_s']):
      raise ValueError(f'bench.json: {where}.times_s must be a non-empty '
                       'list of positive seconds')
    for key in ('tokens_per_s', 'median_s', 'speedup'):
      if r[key] <= 0:
        raise ValueError(f'bench.json: {where}.{key} must be > 0')
    for key in _RESULT_OPTIONAL:
      if key in r and not (_is(r[key], _NUM) and r[key] > 0):
        raise ValueError(f'bench.json: {where}.{key} must be a number > 0, '
                         f'got {r[key]!r}')
    _check_optional(r, _RESULT_OPTIONAL_FIELDS, where)
    if r.get('key_layout', 'k') not in ('k', 'kt'):
      raise ValueError(f'bench.json: {where}.key_layout='
                       f'{r["key_layout"]!r}: expected the resolved layout, '
                       "'k' or 'kt'")
    if r.get('attention_impl', 'xla') not in model_lib.ATTENTION_IMPLS:
      raise ValueError(f'bench.json: {where}.attention_impl='
                       f'{r["attention_impl"]!r}: expected the resolved '
                       f'one, in {model_lib.ATTENTION_IMPLS}')
    _check_profile(r, profiled, where)
    if (r['k'], r['batch']) in seen:
      raise ValueError(f'bench.json: {where} repeats k={r["k"]}, '
                       f'batch={r["batch"]}')
    if r['k'] == 1 and r['speedup'] != 1:
      raise ValueError(f'bench.json: {where}.speedup={r["speedup"]} for '
                       'k=1, the AR baseline itself (expected 1)')
    seen.add((r['k'], r['batch']))
  for k in [1, *d['settings']['ks']]:
    for b in d['settings']['batch_sizes']:
      if (k, b) not in seen:
        raise ValueError(f'bench.json: results has no row for k={k}, '
                         f'batch={b}')
  for i, a in enumerate(d['accelerators']):
    _check_fields(a, _ACCEL, f'accelerators[{i}]')
    if not a['predicted_speedup'] > 0:
      raise ValueError(f'bench.json: accelerators[{i}].predicted_speedup '
                       f'must be > 0, got {a["predicted_speedup"]!r}')
  _check_fields(d['peer'], _PEER, 'peer')
  for i, p in enumerate(d['peer']['results']):
    _check_fields(p, _PEER_RESULT, f'peer.results[{i}]')


def load_bench_json(path: str) -> dict[str, Any]:
  """Reads and validates a bench.json."""
  with open(path) as f:
    d = json.load(f)
  validate_bench_json(d)
  return d
