"""Decoding throughput: the AR teacher (k=1) against K-Forcing students.

`run_bench(config, workdir)` times the jitted whole-decode program
`decode.decode_loop` for k = 1 (teacher) and every k in `bench.ks` (the
smallest trained student window >= k, else random weights: speed does not
depend on the weights) at every batch size in `bench.batch_sizes`, from the
same `bench.prefix_len`-token prompts to `model.seq_len` tokens. Decoding is
greedy (argmax students; `bench.readout='sample'` or `'median'`:
inverse-CDF sampling and students read out that way) with no eos, so every
run does the full work. Compile time is excluded and reported apart; each
cell is the median of `bench.repeats` runs after `bench.warmup` warm-up
runs (plus one untimed run once every k of the batch has compiled), and at
each batch size the repeats of all k are interleaved, so load drift on a
shared machine biases no k.
It also measures this machine's matmul peak and memory bandwidth, predicts
each speedup with a roofline model of a decode step, optionally times a
Hugging Face GPT-2 of the same shape as a peer, and writes
WORKDIR/bench.json and WORKDIR/bench.png.

Its parts: `bench_settings` (the config section), `bench_models` (trained
runs or random weights), `bench_timing` (compiled, interleaved timing and
memory per cell), `roofline` (the cost model and the measured ceilings),
`bench_peer` (Hugging Face generate), `bench_report` (tables, plot) and
`bench_schema` (bench.json and its check).
"""

import json
import os
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import bench_models
from kforcing_jax import bench_peer
from kforcing_jax import bench_report
from kforcing_jax import bench_schema
from kforcing_jax import bench_settings
from kforcing_jax import bench_timing
from kforcing_jax import checkpoints
from kforcing_jax import files
from kforcing_jax import model as model_lib
from kforcing_jax import projection
from kforcing_jax import roofline
from kforcing_jax import sharding
from kforcing_jax import step_profile
from kforcing_jax import torch_threads


def machine_info() -> dict[str, Any]:
  cpu_model = platform.processor() or ''
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.lower().startswith('model name'):
          cpu_model = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  dev = jax.devices()[0]
  return {
      'platform': platform.platform(), 'python': platform.python_version(),
      'cpu_model': cpu_model,
      'cpu_count': torch_threads.usable_cpu_count(),
      'jax_version': jax.__version__, 'backend': jax.default_backend(),
      'device_kind': dev.device_kind, 'device_count': jax.device_count(),
      'load_avg_start': list(os.getloadavg())}


def runnable_others(samples: int = 5, interval_s: float = 0.1,
                    path: str = '/proc/loadavg') -> float | None:
  """Runnable tasks other than the reading one, now: the median over a few
  reads of the running count in /proc/loadavg, minus the reader. None
  where that file is missing or unreadable (not Linux)."""
  counts = []
  for i in range(samples):
    if i:
      time.sleep(interval_s)
    try:
      with open(path) as f:
        running = int(f.read().split()[3].split('/')[0])
    except (OSError, ValueError, IndexError):
      return None
    counts.append(running - 1)
  return float(np.median(counts))


def run_bench(config, workdir: str,
              log: Callable[[str], None] = sharding.print_once
              ) -> dict[str, Any]:
  """Runs the benchmark; writes WORKDIR/bench.json and WORKDIR/bench.png.

  Returns the bench.json dict (its schema: bench_schema.py).
  """
  s = bench_settings.settings_from_config(config)
  files.check_writable(workdir, 'bench writes bench.json and bench.png '
                       'there; pass another --workdir or make it writable')
  machine = machine_info()
  models = bench_models.load_models(config, workdir, s)
  seq_len = min(m.cfg.seq_len for m in models.values())
  bench_settings.check_settings(s, seq_len)
  for m in models.values():  # Their own shapes, which the config may not be.
    bench_settings.check_attention(s, m.cfg.d_model, m.cfg.num_heads, m.name)
  max_new = bench_settings.new_tokens(s, seq_len)
  if s.prefix_len + max_new > seq_len:
    raise ValueError(f'bench.prefix_len + max_new_tokens = '
                     f'{s.prefix_len + max_new} > model.seq_len={seq_len}')
  ar_cfg = models[1].cfg
  untrained = [k for k, m in sorted(models.items()) if m.weights == 'random']
  if untrained and not s.random_weights:  # Asked-for ones need no notice.
    log(f'[bench] NOTE: no trained run in {workdir} serves k={untrained}: '
        'timed with random weights of the same shape (speed does not '
        'depend on them; bench.random_weights=True says so up front)')
  # The checkpoint of every run here (see evaluate).
  records = checkpoints.workdir_records(workdir)
  timed = {m.name for m in models.values() if m.weights == 'trained'}
  for note in checkpoints.unfinished_runs(
      {run: records[run] for run in sorted(timed) if run in records}, config,
      workdir):
    log(f'[bench] NOTE: {note}')
  log(f'[bench] {config.get("name", "?")}: {machine["cpu_count"]} cores '
      f'({machine["cpu_model"]}), backend {machine["backend"]} '
      f'({machine["device_kind"]}); {s.prefix_len}-token prompts + '
      f'{max_new} new tokens; batches {list(s.batch_sizes)}; k = 1, '
      f'{list(s.ks)}; median of {s.repeats} (interleaved)')

  # Other work on the cores skews every number below, torch's most. The
  # 1-minute load average also counts this process's own work just before
  # (the pipeline's evaluate stage), so where /proc allows, ask what else
  # is runnable now.
  others = runnable_others()
  if others is None:
    busy = machine['load_avg_start'][0]
    what = f'1-minute load average {busy:.1f}'
  else:
    busy, what = others, f'{others:g} other runnable processes'
  if busy > 0.5 * machine['cpu_count']:
    log(f'[bench] WARNING: {what} on {machine["cpu_count"]} cores: this '
        'machine is busy, timings will be noisy; rerun on a quiet machine '
        'for numbers to report')
  roof = _roofline_numbers(s, ar_cfg, log)
  vocab = min(m.cfg.vocab_size for m in models.values())
  big = bench_models.make_prompts(config, workdir, s, max(s.batch_sizes), vocab)
  # Every batch size decodes the first rows of the same prompts.
  prompts = {b: big[:b] for b in s.batch_sizes}

  results = []
  for batch in s.batch_sizes:
    cells = bench_timing.time_batch(models, prompts[batch], max_new, s)
    for cell in cells:
      r = cell.result()
      results.append(r)
      spread = (max(r['times_s']) - min(r['times_s'])) / r['median_s']
      log(f'[bench] {r["model"]} ({r["weights"]}) k={r["k"]} '
          f'batch={batch}: {r["tokens_per_s"]:.1f} tok/s, median '
          f'{r["median_s"]:.4f} s (spread {100 * spread:.0f}%), compile '
          f'{r["compile_s"]:.2f} s, RSS '
          f'+{r["memory"]["host_rss_delta_mib"]:.1f} MiB, peak '
          f'{bench_report.mib(bench_report.compiled_peak_bytes(r["memory"]))}'
          ' MiB (compiled)')
    if s.profile:  # After the timed runs, so tracing cannot slow them.
      _profile_cells(cells, results[-len(cells):], workdir, log)

  ar_shape = roofline.ModelShape.of(models[1].cfg, models[1].params)
  ar_tps = {r['batch']: r['tokens_per_s'] for r in results if r['k'] == 1}
  for r in results:
    pf = models[r['k']]
    pf_shape = (roofline.ModelShape.of(pf.cfg, pf.params) if r['k'] > 1
                else ar_shape)
    preds = roofline.predictions(ar_shape, pf_shape, r['batch'], r['k'],
                                 s.prefix_len, max_new, roof['peak_flops'],
                                 roof['bandwidth'])
    r['speedup'] = r['tokens_per_s'] / ar_tps[r['batch']]
    r['predicted_speedup_modes'] = preds
    r['predicted_speedup'] = preds[s.roofline]
    r['measured_over_predicted'] = r['speedup'] / r['predicted_speedup']
    flops, nbytes = roofline.decode_totals(pf_shape, r['batch'], s.prefix_len,
                                  r['k'], max_new)
    r['model_flops'], r['model_bytes'] = flops, nbytes
    r['achieved_flops_per_s'] = flops / r['median_s']
    r['achieved_bytes_per_s'] = nbytes / r['median_s']

  peer = {'available': False, 'library': '', 'results': [],
          'note': 'disabled (bench.peer=False)'}
  if s.peer:
    peer = bench_peer.run_peer(ar_cfg, prompts, max_new, s, log)
  if not peer['available']:
    log(f'[bench] {peer["note"]}')
  pf_k = 4 if 4 in s.ks else max(s.ks, default=1)
  pf_tps = {r['batch']: r['tokens_per_s'] for r in results if r['k'] == pf_k}
  for p in peer['results']:
    p['pf_k'] = pf_k
    p['ours_ar_over_peer'] = ar_tps[p['batch']] / p['tokens_per_s']
    p['ours_pf_over_peer'] = pf_tps[p['batch']] / p['tokens_per_s']

  machine['load_avg_end'] = list(os.getloadavg())
  out = {
      'schema_version': bench_schema.SCHEMA_VERSION,
      'config_name': str(config.get('name', '')),
      'created_unix': time.time(),
      'machine': machine,
      'settings': {
          'batch_sizes': list(s.batch_sizes), 'ks': list(s.ks),
          'prefix_len': s.prefix_len, 'max_new_tokens': max_new,
          'repeats': s.repeats, 'warmup': s.warmup, 'prompts': s.prompts,
          'random_weights': s.random_weights, 'peer': s.peer,
          'roofline': s.roofline, 'seed': s.seed,
          'key_layout': s.key_layout, 'attention_impl': s.attention_impl,
          'profile': s.profile, 'readout': s.readout,
          'kernel_impl': s.kernel_impl,
          'kernel_impl_resolved': projection.resolved(s.kernel_impl)},
      'models': _model_entries(models),
      'roofline': roof,
      'results': results,
      'accelerators': roofline.accelerator_predictions(
          ar_cfg, s.batch_sizes, s.ks, s.prefix_len, max_new),
      'peer': peer,
      'checkpoints': records,
  }
  bench_schema.validate_bench_json(out)
  log('\n' + bench_report.format_tables(out))
  if sharding.is_main_process():  # Each process timed its own devices.
    # The plot first: bench.json marks the stage done for a re-run, so a
    # kill between the two left its numbers without their plot.
    bench_report.plot_bench(out, os.path.join(workdir, 'bench.png'))
    files.atomic_write_text(os.path.join(workdir, 'bench.json'),
                            json.dumps(out, indent=1))
    log(f'[bench] wrote {os.path.join(workdir, "bench.json")} and bench.png')
  return out


def _profile_cells(cells: list[bench_timing.Cell],
                   results: list[dict[str, Any]], workdir: str,
                   log: Callable[[str], None]) -> None:
  """Traces one more decode of each cell; adds r['profile'] and logs one
  batch's table."""
  process = (f'_p{jax.process_index()}' if jax.process_count() > 1 else '')
  labelled = []
  for cell, r in zip(cells, results):
    name = f'{r["model"]}_k{r["k"]}_b{r["batch"]}{process}'
    try:
      r['profile'] = step_profile.profile_run(
          cell.run, os.path.join(workdir, 'profile', name), cell.steps)
    except Exception as e:  # pylint: disable=broad-except
      # The timings are made; a failed trace must not lose them.
      r['profile_error'] = f'{type(e).__name__}: {e}'
      log(f'[bench] WARNING: profiling {name} failed ({r["profile_error"]});'
          ' its timings stand, its profile is left out')
      continue
    labelled.append((f'k={r["k"]}', r['profile']))
  if labelled:
    log(step_profile.format_profiles(results[0]['batch'], labelled))


def _roofline_numbers(s: bench_settings.BenchSettings,
                      cfg: model_lib.ModelConfig, log) -> dict[str, Any]:
  # Either ceiling may be given (bench.peak_flops / bench.bandwidth) and
  # the other measured: each is recorded and said as what it is.
  peak_measured, bw_measured = not s.peak_flops, not s.bandwidth
  dtype = jnp.dtype(cfg.compute_dtype)
  peak = s.peak_flops or roofline.measure_peak_flops(s.matmul_size,
                                                     s.repeats, dtype)
  peak_how = (f'{dtype.name} {s.matmul_size}^3 matmul, measured'
              if peak_measured else 'given')
  fresh = None
  if s.bandwidth:
    bw, moved, bw_how = s.bandwidth, 0, 'given'
  else:
    bw, moved = roofline.measure_bandwidth(s.copy_mib, s.repeats)
    # For reference: the same op into a new buffer (page-fault bound).
    fresh, _ = roofline.measure_bandwidth(s.copy_mib, s.repeats, in_place=False)
    bw_how = f'in place, {fresh / 1e9:.2f} GB/s into fresh buffers, measured'
  log(f'[bench] roofline: peak {peak / 1e9:.1f} GFLOP/s ({peak_how}), '
      f'bandwidth {bw / 1e9:.2f} GB/s ({bw_how}); '
      f'ridge {peak / bw:.1f} FLOP/byte; mode {s.roofline!r}')
  return {'peak_flops': float(peak), 'peak_flops_dtype': dtype.name,
          'matmul_size': s.matmul_size, 'bandwidth': float(bw),
          'bandwidth_fresh_alloc': None if fresh is None else float(fresh),
          'copy_bytes': int(moved), 'measured': peak_measured and bw_measured,
          'peak_flops_measured': peak_measured,
          'bandwidth_measured': bw_measured, 'mode': s.roofline}


def _model_entries(
    models: dict[int, bench_models.BenchModel]) -> list[dict[str, Any]]:
  seen, out = set(), []
  for m in models.values():
    if id(m) in seen:
      continue
    seen.add(id(m))
    out.append({'name': m.name, 'weights': m.weights,
                'noise_window': m.cfg.noise_window,
                'num_params': int(model_lib.count_params(m.params)),
                'serves_k': list(m.serves_k)})
  return out
