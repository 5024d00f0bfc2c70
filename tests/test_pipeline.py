"""The main job end to end on the tiny config: interrupted, then resumed."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from kforcing_jax import bench
from kforcing_jax import bench_schema
from kforcing_jax import checkpoints
from kforcing_jax import pipeline
from kforcing_jax import report
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ('teacher', 'student_k1', 'student_k2', 'student_k4')
# Small enough for about a minute on 2 CPU cores.
SMALL = ['--config.distill.steps_per_stage=20', '--config.eval.num_samples=4',
         '--config.eval.batch_size=4', '--config.eval.bootstrap=20',
         '--config.bench.batch_sizes=(1,)', '--config.bench.ks=(4,)',
         '--config.bench.repeats=1', '--config.bench.peer=False',
         '--config.bench.matmul_size=128', '--config.bench.copy_mib=4']


def _pipeline_cmd(workdir, *extra):
  return [sys.executable, '-m', 'kforcing_jax', 'pipeline',
          '--config=configs/tiny.py', f'--workdir={workdir}', *SMALL, *extra]


_ENV = dict(os.environ, XLA_FLAGS=helpers.xla_flags())  # One device: faster.


def _pipeline(workdir, *extra):
  return subprocess.run(_pipeline_cmd(workdir, *extra), cwd=ROOT, env=_ENV,
                        capture_output=True, text=True, timeout=900)


def _kill_at(workdir, banner):
  """Runs the pipeline and SIGKILLs it once it prints `banner`."""
  proc = subprocess.Popen(_pipeline_cmd(workdir), cwd=ROOT, env=_ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True)
  watchdog = threading.Timer(900, proc.kill)  # A hung run ends the wait.
  watchdog.start()
  seen = False
  for line in proc.stdout:
    if banner in line:
      seen = True
      break
  watchdog.cancel()
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert seen, 'the pipeline ended (or hung) before the banner'


def _run_seconds(workdir, run):
  with open(os.path.join(workdir, 'pipeline.json')) as f:
    return json.load(f)['runs'][run]['seconds']


def _finished_work(workdir):
  """Digest of every finished stage's outputs: metrics, checkpoints, eval."""
  out = {}
  paths = [os.path.join(workdir, 'eval.json')]
  for run in RUNS:
    paths.append(os.path.join(workdir, run, 'metrics.jsonl'))
    ckpt = os.path.join(workdir, run, 'checkpoints')
    out[ckpt] = sorted(os.listdir(ckpt))
  for path in paths:
    with open(path, 'rb') as f:
      out[path] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.mark.slow
def test_tiny_pipeline_resumes_without_redoing_finished_stages(tmp_path):
  workdir = str(tmp_path)
  # The first run is killed during the benchmark, after teacher,
  # distillation and evaluate have finished.
  _kill_at(workdir, '] bench ===')
  assert not os.path.exists(os.path.join(workdir, 'bench.json'))
  before = _finished_work(workdir)
  assert all(before.values())

  second = _pipeline(workdir)
  assert second.returncode == 0, second.stderr[-2000:]
  assert 'eval.json exists: skipped' in second.stdout
  assert _finished_work(workdir) == before  # Nothing finished was redone.
  # Validates the schema.
  bench_schema.load_bench_json(os.path.join(workdir, 'bench.json'))
  with open(os.path.join(workdir, 'pipeline.json')) as f:
    stages = json.load(f)['stages']
  assert {'evaluate', 'bench'} <= set(stages)
  with open(os.path.join(workdir, 'report.md')) as f:
    report = f.read()
  for section in ('## Training', '## Quality', '## Decoding speed'):
    assert section in report
  # AR sampling flags on a student are said to be ignored, not dropped
  # silently.
  gen = subprocess.run(
      [sys.executable, '-m', 'kforcing_jax', 'generate', f'--workdir={workdir}',
       '--k=4', '--greedy', '--max_new_tokens=4'], cwd=ROOT,
      capture_output=True, text=True, timeout=300, env=_ENV)
  assert gen.returncode == 0, gen.stderr[-2000:]
  assert 'NOTE: --greedy ignored' in gen.stderr
  assert json.loads(gen.stdout)['model'] == 'student_k4'

  # A copied workdir (new file times, same checkpoints) is not stale: the
  # result files record the checkpoint of each run they used.
  for run in ('teacher', 'student_k1', 'student_k2', 'student_k4'):
    for root, _, _ in os.walk(os.path.join(workdir, run, 'checkpoints')):
      os.utime(root)
  for name in ('eval.json', 'bench.json'):
    assert checkpoints.runs_newer_than(workdir, name) == []
  eval_path = os.path.join(workdir, 'eval.json')
  with open(eval_path) as f:
    kept = f.read()
  evaluated = json.loads(kept)
  evaluated['checkpoints']['student_k2']['run_id'] = '0' * 16
  with open(eval_path, 'w') as f:
    json.dump(evaluated, f)
  assert checkpoints.runs_newer_than(workdir, 'eval.json') == ['student_k2']
  with open(eval_path, 'w') as f:
    f.write(kept)

  # Training the teacher on leaves every later result stale: each re-run
  # says so (nothing is deleted for the user).
  teacher_seconds = _run_seconds(workdir, 'teacher')
  third = _pipeline(workdir, '--config.train.num_steps=50')
  assert third.returncode == 0, third.stderr[-2000:]
  # Wall time sums the resumed segment onto the first one.
  assert _run_seconds(workdir, 'teacher') > teacher_seconds > 0
  assert '[teacher] resuming from the checkpoint at step 40 of 50' in \
      third.stdout
  assert ('[student_k1] WARNING: trained from teacher at step 40, which is '
          'now at step 50: student_k1 and the stages after it are stale'
          ) in third.stdout
  for name in ('eval.json', 'bench.json'):
    assert f'WARNING: {name} predates the latest checkpoint of teacher' in \
        third.stdout
  # The report says so too, above the tables of the older models.
  with open(os.path.join(workdir, 'report.md')) as f:
    report_text = f.read()
  for name in ('eval.json', 'bench.json'):
    assert f'**Stale:** {name} predates the latest checkpoint of teacher' in \
        report_text
  with open(os.path.join(workdir, 'pipeline.json')) as f:
    recorded_id = json.load(f)['runs']['teacher']['run_id']
  assert recorded_id == checkpoints.workdir_records(workdir)['teacher'][
      'run_id']


def test_a_run_trained_anew_restarts_its_pipeline_seconds():
  # Deleting a run and re-running the pipeline trained it anew, but its
  # seconds in pipeline.json (and report.md) added the old run's.
  import types  # pylint: disable=g-import-not-at-top
  timing = {'runs': {}}
  def result(seconds, run_id):
    return types.SimpleNamespace(run_dir='/w/student_k4', seconds=seconds,
                                 tokens_per_s=1.0, run_id=run_id)
  pipeline._add_run(timing, result(50.0, 'a'))  # pylint: disable=protected-access
  pipeline._add_run(timing, result(20.0, 'a'))  # Resumed: summed.  # pylint: disable=protected-access
  assert timing['runs']['student_k4']['seconds'] == 70.0
  pipeline._add_run(timing, result(30.0, 'b'))  # Trained anew.  # pylint: disable=protected-access
  assert timing['runs']['student_k4'] == {'seconds': 30.0, 'run_id': 'b',
                                          'tokens_per_s': 1.0}
  # A pipeline.json from before run ids: the next segment adds to it.
  timing = {'runs': {'teacher': {'seconds': 5.0}}}
  pipeline._add_run(timing, types.SimpleNamespace(  # pylint: disable=protected-access
      run_dir='/w/teacher', seconds=1.0, tokens_per_s=0.0, run_id='c'))
  assert timing['runs']['teacher'] == {'seconds': 6.0, 'run_id': 'c'}


def test_only_process_0_writes_timing_and_report(tmp_path, monkeypatch):
  from kforcing_jax import pipeline  # pylint: disable=g-import-not-at-top
  from kforcing_jax import report  # pylint: disable=g-import-not-at-top
  timing = {'runs': {}}
  monkeypatch.setattr(pipeline.sharding, 'is_main_process', lambda: False)
  pipeline._save_timing(str(tmp_path), timing)  # pylint: disable=protected-access
  report.write_report(str(tmp_path))
  assert not os.listdir(tmp_path)
  monkeypatch.undo()
  pipeline._save_timing(str(tmp_path), timing)  # pylint: disable=protected-access
  report.write_report(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ['pipeline.json', 'report.md']


def _fake_stages(monkeypatch, workdir, calls: list) -> None:
  """Every stage of run_pipeline faked: each appends its name to calls."""
  import types  # pylint: disable=g-import-not-at-top
  from kforcing_jax import commands  # pylint: disable=g-import-not-at-top
  from kforcing_jax import evaluate  # pylint: disable=g-import-not-at-top
  from kforcing_jax import evaluator_train  # pylint: disable=g-import-not-at-top
  from kforcing_jax import hf_evaluator  # pylint: disable=g-import-not-at-top
  done = types.SimpleNamespace(seconds=0, tokens_per_s=0, preempted=False,
                               run_dir=str(workdir / 'teacher'), name='teacher',
                               steps=0)
  monkeypatch.setattr(commands, 'run_teacher', lambda c, w, **_: done)
  monkeypatch.setattr(commands, 'run_distill',
                      lambda c, w, on_result=None: [])
  monkeypatch.setattr(pipeline, '_add_run', lambda timing, r: None)
  monkeypatch.setattr(hf_evaluator, 'import_transformers', lambda *a: None)
  monkeypatch.setattr(evaluate, 'run_evaluate',
                      lambda c, w: calls.append('evaluate'))
  monkeypatch.setattr(bench, 'run_bench', lambda c, w: calls.append('bench'))
  monkeypatch.setattr(report, 'write_report', lambda w: 'report.md')
  monkeypatch.setattr(evaluator_train, 'train_evaluator',
                      lambda c, w: calls.append('train_evaluator') or w)


@pytest.mark.parametrize('process', [0, 1])
def test_only_process_0_prints_the_pipeline_log(tmp_path, monkeypatch, capsys,
                                                process):
  # Every process of a pod run runs the pipeline, and each printed every
  # banner and note: a worker's log repeated process 0's.
  import jax  # pylint: disable=g-import-not-at-top
  from kforcing_jax import defaults  # pylint: disable=g-import-not-at-top
  calls = []
  _fake_stages(monkeypatch, tmp_path, calls)
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: True)
  monkeypatch.setattr(jax, 'process_index', lambda *a, **k: process)
  (tmp_path / 'bench.json').write_text('{}')  # Said to be skipped.
  pipeline.run_pipeline(defaults.base_config(), str(tmp_path))
  assert calls == ['evaluate']
  out = capsys.readouterr().out
  if process:
    assert not out
  else:
    for line in ('=== [1/5] AR teacher ===', '=== [5/5] report ===',
                 'bench.json exists: skipped', 'report: report.md'):
      assert line in out


def test_evaluator_is_not_trained_when_eval_json_is_kept(tmp_path, monkeypatch,
                                                         capsys):
  # evaluate skips when eval.json exists, so a freshly trained evaluator
  # would score nothing: minutes of work for no result. Stages are faked.
  from kforcing_jax import defaults  # pylint: disable=g-import-not-at-top
  from kforcing_jax import evaluator_train  # pylint: disable=g-import-not-at-top
  calls = []
  _fake_stages(monkeypatch, tmp_path, calls)
  config = defaults.base_config()
  config.evaluator_train.enabled = True
  (tmp_path / 'eval.json').write_text('{}')
  pipeline.run_pipeline(config, str(tmp_path))
  assert calls == ['bench']
  assert 'evaluator not trained' in capsys.readouterr().out
  # A finished evaluator is said to be there, not "not trained".
  (tmp_path / 'evaluator').mkdir()
  (tmp_path / 'evaluator' / evaluator_train.INFO_FILE).write_text('{}')
  pipeline.run_pipeline(config, str(tmp_path))
  out = capsys.readouterr().out
  assert 'is trained: skipped' in out and 'not trained' not in out
  assert calls == ['bench', 'bench']
  (tmp_path / 'evaluator' / evaluator_train.INFO_FILE).unlink()
  (tmp_path / 'eval.json').unlink()
  pipeline.run_pipeline(config, str(tmp_path))
  # (The fake bench wrote no bench.json, so it runs again.)
  assert calls == ['bench', 'bench', 'train_evaluator', 'evaluate', 'bench']


@pytest.mark.parametrize('stopped_in', ['teacher', 'distill'])
def test_a_sigterm_stopped_stage_ends_the_pipeline_with_143(
    tmp_path, monkeypatch, capsys, stopped_in):
  # Exit 0 after a preemption told a scheduler (or `pipeline && next`)
  # that the job had finished: it was never restarted. Stages are faked.
  import types  # pylint: disable=g-import-not-at-top
  from kforcing_jax import commands  # pylint: disable=g-import-not-at-top
  from kforcing_jax import defaults  # pylint: disable=g-import-not-at-top
  from kforcing_jax import evaluate  # pylint: disable=g-import-not-at-top
  calls = []

  def result(name, preempted):
    return types.SimpleNamespace(seconds=0, tokens_per_s=0,
                                 preempted=preempted, name=name,
                                 run_dir=str(tmp_path / name))
  monkeypatch.setattr(commands, 'run_teacher', lambda c, w, **_: result(
      'teacher', stopped_in == 'teacher'))
  monkeypatch.setattr(commands, 'run_distill', lambda c, w, on_result=None: [
      result('student_k1', False), result('student_k2', True)])
  monkeypatch.setattr(evaluate, 'run_evaluate',
                      lambda c, w: calls.append('evaluate'))
  monkeypatch.setattr(bench, 'run_bench', lambda c, w: calls.append('bench'))
  config = defaults.base_config()
  config.evaluator_train.enabled = False
  flags_obj = types.SimpleNamespace(config=config, workdir=str(tmp_path))
  assert commands.pipeline_cmd(flags_obj) == commands.STOPPED_EXIT_CODE
  assert calls == [] and not (tmp_path / 'report.md').exists()
  assert 'SIGTERM: stopped after saving' in capsys.readouterr().out


def test_report_lists_the_teacher_then_students_by_window(tmp_path):
  # os.listdir order, or a plain sort, put students before the teacher and
  # k16 before k2.
  for i, run in enumerate(['student_k16', 'teacher', 'student_k2',
                           'student_k4', 'student_k1']):
    (tmp_path / run).mkdir()
    (tmp_path / run / 'metrics.jsonl').write_text(
        json.dumps({'step': 10 + i, 'eval_loss': 1.0}) + '\n')
  rows = [line.split('|')[1].strip()
          for line in report.training_section(str(tmp_path))[4:]]
  assert rows == ['teacher', 'student_k1', 'student_k2', 'student_k4',
                  'student_k16']


def test_report_lists_runs_without_evals_and_dates_an_older_eval(tmp_path):
  # A run trained with eval_every=0 was left out of the table; a last eval
  # older than the last step was shown as the step count.
  (tmp_path / 'teacher').mkdir()
  (tmp_path / 'teacher' / 'metrics.jsonl').write_text(
      json.dumps({'step': 5, 'loss': 3.0, 'eval_loss': 2.0}) + '\n' +
      json.dumps({'step': 8, 'loss': 1.0}) + '\n')
  (tmp_path / 'student_k1').mkdir()
  (tmp_path / 'student_k1' / 'metrics.jsonl').write_text(
      json.dumps({'step': 3, 'loss': 1.0}) + '\n')
  assert report.training_section(str(tmp_path))[4:] == [
      '| teacher | 8 | loss=2 (at step 5) |  |',
      '| student_k1 | 3 | none |  |']
  # Results not made yet are said to be missing, not left out silently.
  with open(report.write_report(str(tmp_path))) as f:
    text = f.read()
  assert ('No eval.json in this work directory yet: the `evaluate` '
          'subcommand (or `pipeline`) writes it.') in text
  assert 'No bench.json in this work directory yet: the `bench`' in text


def test_report_speed_block_opens_with_the_table_header(tmp_path):
  # The block used to open with an empty line (format_tables' leading one).
  shutil.copy(os.path.join(ROOT, 'docs', 'bench_demo_cpu.json'),
              tmp_path / 'bench.json')
  lines = report.speed_section(str(tmp_path))
  block = lines.index('```')
  assert lines[block + 1].startswith('batch  k  model')
  assert lines[block + 2] == '```'


def test_report_reads_a_cut_metrics_line_and_names_a_damaged_file(tmp_path):
  # A kill mid-line stopped `report` with a bare JSONDecodeError; so did a
  # damaged eval.json, naming no file.
  (tmp_path / 'teacher').mkdir()
  metrics = tmp_path / 'teacher' / 'metrics.jsonl'
  metrics.write_text(json.dumps({'step': 5, 'loss': 3.0}) + '\n' +
                     '{"step": 10, "lo')
  assert report.training_section(str(tmp_path))[4:] == [
      '| teacher | 5 | none |  |']
  metrics.write_text('{"step": 10, "lo\n' + json.dumps({'step': 5}) + '\n')
  with pytest.raises(ValueError, match=f'{metrics} line 1 is not JSON'):
    report.training_section(str(tmp_path))
  metrics.write_text(json.dumps({'step': 5, 'loss': 3.0}) + '\n')
  (tmp_path / 'eval.json').write_text('{"models": {')
  with pytest.raises(ValueError, match=f"{tmp_path / 'eval.json'} is not "
                     'valid JSON .*; delete it and re-run the command'):
    report.write_report(str(tmp_path))
  # Valid JSON without the fields read: named too, not a bare KeyError.
  (tmp_path / 'eval.json').write_text('{"models": {}}')
  with pytest.raises(ValueError, match=f"{tmp_path / 'eval.json'} lacks a "
                     "field the report reads .KeyError: 'settings'.; delete"):
    report.write_report(str(tmp_path))
  (tmp_path / 'eval.json').unlink()
  (tmp_path / 'bench.json').write_text('{"machine": {}, "results": [1]}')
  with pytest.raises(ValueError, match=f"{tmp_path / 'bench.json'} lacks a "
                     'field the report reads'):
    report.write_report(str(tmp_path))


def test_a_split_evaluate_needs_is_checked_before_training(tmp_path):
  # Five files give no validation split: the pipeline trained the teacher
  # and students, then stopped at evaluate.
  docs = tmp_path / 'docs'
  docs.mkdir()
  for i in range(5):
    (docs / f'd{i}.txt').write_text(f'Document {i}: some words. ' * 40)
  workdir = tmp_path / 'w'
  r = subprocess.run(_pipeline_cmd(
      workdir, '--config.data.source=text',
      f'--config.data.text_glob={docs}/*.txt', '--config.train.eval_every=0',
      '--config.distill.eval_every=0'),
      cwd=ROOT, env=_ENV, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith(
      "error: data.eval_split='validation' has no documents"), r.stderr
  assert not os.path.exists(workdir / 'teacher')


def test_float64_distillation_without_x64_is_refused_before_training(
    tmp_path):
  # It used to train the whole teacher, then fail at distillation step 0.
  workdir = tmp_path / 'w'
  env = {k: v for k, v in _ENV.items() if k != 'JAX_ENABLE_X64'}
  r = subprocess.run(_pipeline_cmd(workdir, '--config.distill.precision=float64'),
                     cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 2, r.stderr
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: distill.precision='float64': precision="
                         "'float64' needs 64-bit floats"), r.stderr
  assert 'JAX_ENABLE_X64=1' in last
  assert not os.path.exists(workdir / 'teacher')


def test_an_evaluator_dir_in_the_way_is_refused_before_training(tmp_path):
  # A file at evaluator_train.dir stopped the pipeline at the evaluator
  # stage, after the teacher and every student had trained.
  (tmp_path / 'afile').write_text('hi')
  workdir = tmp_path / 'w'
  r = subprocess.run(_pipeline_cmd(
      workdir, '--config.evaluator_train.enabled=True',
      f'--config.evaluator_train.dir={tmp_path}/afile'),
      cwd=ROOT, env=_ENV, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines()[-1] == (
      f'error: {tmp_path}/afile exists but is not a finished evaluator (no '
      'train_info.json); delete it or set evaluator_train.dir to another '
      'folder'), r.stderr
  assert not os.path.exists(workdir / 'teacher')
  # Not when the evaluator would not be trained: with eval.json kept, the
  # stage is skipped, and a re-run that finished must still finish.
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.evaluator_train.enabled = True
  config.evaluator_train.dir = str(tmp_path / 'afile')
  with pytest.raises(ValueError, match='is not a finished evaluator'):
    pipeline._check_plan(config, str(workdir))
  workdir.mkdir()
  (workdir / 'eval.json').write_text('{}')
  pipeline._check_plan(config, str(workdir))
