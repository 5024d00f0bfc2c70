"""The main job: teacher -> distill 1, 2, 4 -> evaluate -> bench -> report.

Every stage is resumable: training stages resume from their checkpoints and
finished ones are skipped; evaluate and bench are skipped when their JSON
exists (delete W/eval.json or W/bench.json to redo them). Stage timings go
to W/pipeline.json; the report is rebuilt at the end of every run.

With `evaluator_train.enabled` and an empty `eval.evaluator`, a small
independent evaluator is trained before evaluate (skipped once finished) and
scores that evaluate run.
"""

import importlib.util
import json
import os
import time

from kforcing_jax import checkpoints
from kforcing_jax import commands
from kforcing_jax import data as data_lib
from kforcing_jax import defaults
from kforcing_jax import documents
from kforcing_jax import files
from kforcing_jax import report
from kforcing_jax import sharding
from kforcing_jax import train as train_lib

_show = sharding.print_once  # Once per run, not once per process.


def _banner(i, n, text):
  _show(f'\n=== [{i}/{n}] {text} ===', flush=True)


def _save_timing(workdir, timing):
  if not sharding.is_main_process():  # One writer per multi-process run.
    return
  files.atomic_write_text(os.path.join(workdir, 'pipeline.json'),
                          json.dumps(timing, indent=1))


def _add_run(timing, result):
  """Records a training run's wall time, summed over resumed segments (a
  finished run re-entered does no work and adds nothing). A run trained
  anew (its directory or checkpoints deleted) has another run id: its
  count starts again rather than adding to the old run's."""
  if not result.seconds:
    return
  name = os.path.basename(result.run_dir)
  entry = timing['runs'].get(name)
  if entry is None or entry.get('run_id', result.run_id) != result.run_id:
    entry = timing['runs'][name] = {'seconds': 0.0}
  entry['run_id'] = result.run_id
  entry['seconds'] += result.seconds
  if result.tokens_per_s:
    entry['tokens_per_s'] = result.tokens_per_s  # Of the last segment.


def _stopped():
  _show('SIGTERM: stopped after saving; re-run the same command to resume')


def _trains_evaluator(config) -> bool:
  from kforcing_jax import evaluator_train  # pylint: disable=g-import-not-at-top
  settings = evaluator_train.evaluator_settings(config)
  return settings.enabled and not config.eval.evaluator


def _with_evaluator(config, workdir, timing):
  """Trains (or finds) W/evaluator; a config copy whose evaluate uses it.

  Like bench's HF peer, it is skipped with a note when the `eval` extra is
  not installed: evaluate then runs without evaluator perplexity.
  """
  from kforcing_jax import evaluator_train  # pylint: disable=g-import-not-at-top
  from kforcing_jax import hf_evaluator  # pylint: disable=g-import-not-at-top
  try:
    hf_evaluator.import_transformers('evaluator_train.enabled')
  except ImportError as e:
    _show(f'[evaluator] skipped: {e}', flush=True)
    return config
  done = evaluator_train.is_complete(
      evaluator_train.output_dir(config, workdir))
  t0 = time.time()
  path = evaluator_train.train_evaluator(config, workdir)
  if not done:
    timing['stages']['train_evaluator'] = {'seconds': time.time() - t0}
  out = config.copy_and_resolve_references()
  out.eval.evaluator = path
  return out


def _check_plan(config, workdir: str) -> None:
  """Fails now, not after training, on an eval.ks the students this run
  distills cannot serve, an eval.evaluator that is not a save_pretrained
  folder, an evaluator_train.dir that is not free for the evaluator to be
  trained or holds one trained on other data, a distill.precision this
  process cannot run (float64 without x64), or a batch this machine's
  devices cannot split (defaults.validate checked every field's value)."""
  from kforcing_jax import distill  # pylint: disable=g-import-not-at-top
  from kforcing_jax import eval_settings  # pylint: disable=g-import-not-at-top
  defaults.check_batches(config, teacher=True, distill=True)
  distill.check_precision(config.distill.precision)
  settings = eval_settings.settings_from_config(config)
  if settings.evaluator:  # Here, not in validate: only evaluate reads it.
    from kforcing_jax import hf_evaluator  # pylint: disable=g-import-not-at-top
    hf_evaluator.check_evaluator(settings.evaluator)
  if (_trains_evaluator(config)  # A file there failed after all training.
      and not os.path.exists(os.path.join(workdir, 'eval.json'))
      and importlib.util.find_spec('transformers') is not None):
    from kforcing_jax import evaluator_train  # pylint: disable=g-import-not-at-top
    evaluator_train.check_output_dir(
        config, evaluator_train.output_dir(config, workdir))
  windows = tuple(config.distill.windows)
  too_big = [k for k in settings.ks if k > max(windows)]
  if too_big:
    raise ValueError(f'eval.ks asks for k={too_big[0]} but the largest '
                     f'distill.windows is {max(windows)}')
  # Every split the stages read; an empty or unknown one used to stop the
  # run at evaluate, after training.
  documents.check_splits(config, data_lib.training_splits(
      config, held_out=True) + [
          ('eval.split', settings.split or config.data.eval_split)])


def run_pipeline(config, workdir: str) -> str | None:
  """Runs (or resumes) every stage; returns the report path, or None when
  a SIGTERM stopped a training stage (saved; a re-run resumes it)."""
  from kforcing_jax import bench  # pylint: disable=g-import-not-at-top
  from kforcing_jax import evaluate  # pylint: disable=g-import-not-at-top
  _check_plan(config, workdir)  # Before anything is written.
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'pipeline.json')
  timing = {'runs': {}, 'stages': {}}
  if os.path.exists(path):
    with open(path) as f:
      timing = json.load(f)
  t_all = time.time()
  train_eval = _trains_evaluator(config)
  n = 6 if train_eval else 5

  def record(r):
    _add_run(timing, r)
    _save_timing(workdir, timing)

  try:
    _banner(1, n, 'AR teacher')
    r = commands.run_teacher(config, workdir, then_distill=True)
    record(r)
    if r.preempted:
      return _stopped()

    _banner(2, n, f'distillation, windows {tuple(config.distill.windows)}')
    for r in commands.run_distill(config, workdir, on_result=record):
      if r.preempted:
        return _stopped()
  except train_lib.Interrupted as e:  # Ctrl-C: keep the segment's time.
    record(e.result)
    raise

  if train_eval:
    _banner(3, n, 'independent evaluator')
    if os.path.exists(os.path.join(workdir, 'eval.json')):
      from kforcing_jax import evaluator_train  # pylint: disable=g-import-not-at-top
      trained = evaluator_train.output_dir(config, workdir)
      if evaluator_train.is_complete(trained):
        _show(f'{trained} is trained: skipped (eval.json exists, so '
              'evaluate will not run)')
      else:
        # evaluate will skip, so an evaluator trained now would score
        # nothing.
        _show('eval.json exists, so evaluate will not run: evaluator not '
              'trained (delete eval.json to train it and score with it)')
    else:
      config = _with_evaluator(config, workdir, timing)
      _save_timing(workdir, timing)

  for i, (name, fn, out) in enumerate(
      [('evaluate', evaluate.run_evaluate, 'eval.json'),
       ('bench', bench.run_bench, 'bench.json')], start=n - 2):
    _banner(i, n, name)
    if os.path.exists(os.path.join(workdir, out)):
      _show(f'{out} exists: skipped (delete it to redo)')
      newer = checkpoints.runs_newer_than(workdir, out)
      if newer:
        _show(f'WARNING: {out} predates the latest checkpoint of '
              f'{", ".join(newer)}: it describes older models (or lacks '
              'them); delete it and re-run to redo it')
      continue
    t0 = time.time()
    fn(config, workdir)
    timing['stages'][name] = {'seconds': time.time() - t0}
    _save_timing(workdir, timing)

  _banner(n, n, 'report')
  timing['last_run_seconds'] = time.time() - t_all  # This invocation only.
  _save_timing(workdir, timing)
  out = report.write_report(workdir)
  _show(f'report: {out} (this run: {timing["last_run_seconds"]:.0f} s)')
  return out
