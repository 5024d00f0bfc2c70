"""The main job: teacher -> distill 1, 2, 4 -> evaluate -> bench -> report.

Every stage is resumable: training stages resume from their checkpoints and
finished ones are skipped; evaluate and bench are skipped when their JSON
exists (delete W/eval.json or W/bench.json to redo them). Stage timings go
to W/pipeline.json; the report is rebuilt at the end of every run.
"""

import json
import os
import time

from kforcing_jax import commands
from kforcing_jax import report


def _banner(i, n, text):
  print(f'\n=== [{i}/{n}] {text} ===', flush=True)


def _save_timing(workdir, timing):
  with open(os.path.join(workdir, 'pipeline.json'), 'w') as f:
    json.dump(timing, f, indent=1)


def _stopped(workdir):
  print('SIGTERM: stopped after saving; re-run the same command to resume')
  return os.path.join(workdir, 'report.md')


def run_pipeline(config, workdir: str) -> str:
  """Runs (or resumes) every stage; returns the report path."""
  from kforcing_jax import bench  # pylint: disable=g-import-not-at-top
  from kforcing_jax import evaluate  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'pipeline.json')
  timing = {'runs': {}, 'stages': {}}
  if os.path.exists(path):
    with open(path) as f:
      timing = json.load(f)
  t_all = time.time()
  n = 5

  _banner(1, n, 'AR teacher')
  r = commands.run_teacher(config, workdir)
  if r.seconds:
    timing['runs']['teacher'] = {'seconds': r.seconds,
                                 'tokens_per_s': r.tokens_per_s}
  _save_timing(workdir, timing)
  if r.preempted:
    return _stopped(workdir)

  _banner(2, n, f'distillation, windows {tuple(config.distill.windows)}')
  for r in commands.run_distill(config, workdir):
    if r.seconds:
      timing['runs'][os.path.basename(r.run_dir)] = {'seconds': r.seconds}
    if r.preempted:
      _save_timing(workdir, timing)
      return _stopped(workdir)
  _save_timing(workdir, timing)

  for i, (name, fn, out) in enumerate(
      [('evaluate', evaluate.run_evaluate, 'eval.json'),
       ('bench', bench.run_bench, 'bench.json')], start=3):
    _banner(i, n, name)
    if os.path.exists(os.path.join(workdir, out)):
      print(f'{out} exists: skipped (delete it to redo)')
      continue
    t0 = time.time()
    fn(config, workdir)
    timing['stages'][name] = {'seconds': time.time() - t0}
    _save_timing(workdir, timing)

  _banner(5, n, 'report')
  timing['last_run_seconds'] = time.time() - t_all
  _save_timing(workdir, timing)
  out = report.write_report(workdir)
  print(f'report: {out} (this run: {timing["last_run_seconds"]:.0f} s)')
  return out
