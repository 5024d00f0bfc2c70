"""The command line's help and usage errors (subprocesses: real argv)."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import types

import numpy as np
import pytest

from kforcing_jax import cli
from kforcing_jax import config_files
from kforcing_jax import sharding


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'kforcing_jax', *args],
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('args', [['--help'], ['-h'], ['help']])
def test_help_lists_every_subcommand_and_flag_and_exits_0(args):
  r = _cli(*args)
  assert r.returncode == 0, r.stderr
  for name in cli.SUBCOMMANDS:
    assert f'\n  {name} ' in r.stdout
  for flag in ('--workdir', '--config', '--prompt', '--k'):
    assert flag + ':' in r.stdout
  assert 'kforcing_jax/defaults.py' in r.stdout


def test_subcommand_help_runs_nothing_and_names_the_subcommand(tmp_path):
  workdir = tmp_path / 'w'
  r = _cli('pipeline', '--config=configs/tiny.py', f'--workdir={workdir}',
           '--help')
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith('python -m kforcing_jax pipeline: Teacher,')
  assert not workdir.exists()


def test_help_after_double_dash_or_as_a_flag_value_is_not_help(tmp_path):
  r = _cli('--', '--help')
  assert r.returncode == 2
  assert r.stdout == ''
  # `help` as the value of --prompt: generate runs (and fails: no model).
  r = _cli('generate', f'--workdir={tmp_path}', '--prompt', 'help')
  assert r.returncode == 2
  assert r.stdout == ''
  assert 'teacher' in r.stderr


@pytest.mark.parametrize('args, needle', [
    ([], 'unknown or missing subcommand: (none)'),
    (['trian-teacher', '--workdir=w'], 'unknown or missing subcommand: '
     'trian-teacher'),
    (['bench', '--workdir=w', '--bogus=1'], "Unknown command line flag 'bogus'"),
    # An unquoted multi-word prompt: 'nation' is not a subcommand problem.
    (['generate', '--workdir=w', '--prompt', 'The', 'nation'],
     'unexpected argument(s) after generate: nation (quote a value with '
     'spaces)'),
])
def test_usage_errors_exit_2_and_point_at_help(args, needle):
  r = _cli(*args)
  assert r.returncode == 2
  assert r.stderr.startswith('error: ')
  assert needle in r.stderr
  assert 'python -m kforcing_jax --help' in r.stderr


def test_generate_refuses_a_seed_a_jax_key_cannot_hold(tmp_path):
  r = _cli('generate', f'--workdir={tmp_path}', '--prompt=a',
           '--seed=4294967296')
  assert r.returncode == 2
  assert r.stderr == ('error: --seed=4294967296 must be an int in '
                      '[0, 2**32)\n')


def test_a_url_workdir_is_refused(tmp_path):
  # It used to become the local folder ./gs:/b/kf, silently.
  r = subprocess.run([sys.executable, '-m', 'kforcing_jax', 'train-teacher',
                      f'--config={os.path.abspath("configs/tiny.py")}',
                      '--workdir=gs://b/kf'],
                     capture_output=True, text=True, timeout=120,
                     cwd=tmp_path)
  assert r.returncode == 2
  assert r.stderr.startswith('error: --workdir=gs://b/kf is a URL')
  assert 'mount the bucket' in r.stderr
  assert not (tmp_path / 'gs:').exists()


def test_a_tilde_workdir_is_the_home_directory(tmp_path):
  # The shell does not expand ~ after --workdir=: it became a folder ./~.
  home, cwd = tmp_path / 'home', tmp_path / 'cwd'
  cwd.mkdir()
  r = subprocess.run([sys.executable, '-m', 'kforcing_jax', 'report',
                      '--workdir=~/kf'], capture_output=True, text=True,
                     timeout=120, cwd=cwd, env={**os.environ, 'HOME': str(home)})
  assert r.stderr == (f"error: --workdir={home / 'kf'} holds no teacher, "
                      'eval.json or bench.json: nothing to report\n')
  assert not (cwd / '~').exists()


@pytest.mark.parametrize('body, needle', [
    ('from kforcing_jax import defaults\n'
     'def get_config():\n'
     '  c = defaults.base_config()\n'
     '  c.train.num_step = 5\n'
     '  return c\n',
     "unknown config field 'num_step' (did you mean 'num_steps'?)"),
    ('def get_config():\n  return 1 / 0\n',
     'ZeroDivisionError: division by zero'),
])
def test_error_inside_a_config_file_is_one_line(tmp_path, body, needle):
  # The base config is locked, so a misspelled field in a config file
  # fails instead of adding a field nothing reads.
  path = tmp_path / 'my_config.py'
  path.write_text(body)
  r = _cli('train-teacher', f'--config={path}', f'--workdir={tmp_path / "w"}')
  assert r.returncode == 2
  assert r.stderr == f'error: --config={path}: {needle}' + (
      '; see kforcing_jax/defaults.py for every field\n'
      if 'unknown' in needle else '\n')
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('field', ['train.batch_size', 'distill.batch_size'])
def test_batch_not_divisible_by_devices_fails_before_training(tmp_path,
                                                                field):
  # 8 fake CPU devices (conftest). The distillation batch used to be
  # refused only after the teacher had trained, under train.batch_size.
  r = _cli('pipeline', '--config=configs/tiny.py', f'--workdir={tmp_path}/w',
           f'--config.{field}=12')
  assert r.returncode == 2, r.stderr
  assert r.stderr == (f'error: {field}=12 is not divisible by the 8 devices '
                      'of the data axis\n')
  assert not (tmp_path / 'w').exists()


def test_a_distill_batch_the_held_out_split_cannot_fill_fails_first(
    tmp_path):
  # The pipeline trained the whole teacher, then stopped at distillation's
  # held-out batches (one document: 110 validation sequences).
  r = _cli('pipeline', '--config=configs/tiny.py', f'--workdir={tmp_path}/w',
           '--config.data.max_documents=1', '--config.distill.batch_size=128')
  assert r.returncode == 2, r.stderr
  assert ('\nerror: distill.batch_size=128 (its held-out evals, '
          "distill.eval_every=100): Eval split 'validation' has 110 "
          'sequences of seq_len 32, fewer than batch_size 128. Lower the '
          'batch size, give data.eval_split more text, or set '
          'distill.eval_every=0 to train without held-out evals.\n'
          ) in r.stderr
  assert not (tmp_path / 'w' / 'teacher' / 'checkpoints').exists()


def test_a_teacher_batch_the_held_out_split_cannot_fill_names_the_fix(
    tmp_path):
  # It named neither the setting nor a way out.
  r = _cli('train-teacher', '--config=configs/tiny.py',
           f'--workdir={tmp_path}', '--config.data.max_documents=1',
           '--config.train.batch_size=128')
  assert r.returncode == 2, r.stderr
  assert r.stderr.endswith(
      '\nerror: train.batch_size=128 (its held-out evals, '
      "train.eval_every=20): Eval split 'validation' has 110 sequences of "
      'seq_len 32, fewer than batch_size 128. Lower the batch size, give '
      'data.eval_split more text, or set train.eval_every=0 to train '
      'without held-out evals.\n')


def test_a_held_out_split_short_of_eval_batches_is_noted(tmp_path):
  # It gave fewer batches than train.eval_batches without a word.
  r = _cli('train-teacher', '--config=configs/tiny.py', f'--workdir={tmp_path}',
           '--config.data.max_documents=1', '--config.train.num_steps=1',
           '--config.train.eval_every=1', '--config.train.eval_batches=500')
  assert r.returncode == 0, r.stderr
  assert ('[teacher] NOTE: the held-out split gives 13 of the 500 eval '
          'batches asked for (8 sequences each); its evals use those'
          ) in r.stdout


def test_distillation_evals_take_distill_eval_batches(tmp_path):
  # Distillation used min(train.eval_batches, 4) with no field of its own.
  w = f'--workdir={tmp_path}'
  base = ('--config=configs/tiny.py', w, '--config.data.max_documents=1',
          '--config.train.num_steps=1', '--config.train.eval_every=0')
  assert _cli('train-teacher', *base).returncode == 0
  r = _cli('distill', *base, '--config.distill.windows=(1,)',
           '--config.distill.steps_per_stage=1',
           '--config.distill.eval_every=1', '--config.distill.eval_batches=500')
  assert r.returncode == 0, r.stderr
  assert ('[distill] NOTE: the held-out split gives 6 of the 500 eval '
          'batches asked for (16 sequences each); its evals use those'
          ) in r.stdout


def test_students_of_a_teacher_trained_anew_are_named_stale(tmp_path):
  # A teacher deleted and retrained to the same step looked like the one
  # the students were distilled from: they were skipped without a word.
  w = f'--workdir={tmp_path}'
  teacher = ('train-teacher', '--config=configs/tiny.py', w,
             '--config.train.num_steps=2', '--config.train.eval_every=0')
  distill = ('distill', '--config=configs/tiny.py', w,
             '--config.train.num_steps=2', '--config.distill.windows=(1,)',
             '--config.distill.steps_per_stage=1',
             '--config.distill.eval_every=0')
  assert _cli(*teacher).returncode == 0
  assert _cli(*distill).returncode == 0
  r = _cli(*distill)
  assert r.returncode == 0 and 'WARNING' not in r.stdout, r.stdout
  shutil.rmtree(tmp_path / 'teacher')
  assert _cli(*teacher).returncode == 0
  r = _cli(*distill)
  assert r.returncode == 0, r.stderr
  assert ('[student_k1] WARNING: trained from teacher at step 2, which was '
          'trained anew since, to the same step: student_k1 and the stages '
          'after it are stale') in r.stdout


def test_mesh_settings_are_said_and_generate_prints_once(tmp_path,
                                                          monkeypatch, capsys):
  # The teacher said '8 device(s)' while mesh.data=2 trained on 2; distill
  # dropped mesh.fsdp=True without a word; every process of a multi-process
  # generate printed the results.
  w = f'--workdir={tmp_path}'
  r = _cli('train-teacher', '--config=configs/tiny.py', w,
           '--config.train.num_steps=1', '--config.train.eval_every=0',
           '--config.mesh.data=2')
  assert r.returncode == 0, r.stderr
  assert '[teacher] 0.13M parameters, 2 of 8 device(s) in 1 process(es)' \
      in r.stdout
  r = _cli('distill', '--config=configs/tiny.py', w,
           '--config.train.num_steps=1', '--config.distill.windows=(1,)',
           '--config.distill.steps_per_stage=1',
           '--config.distill.eval_every=0', '--config.mesh.fsdp=True')
  assert r.returncode == 0, r.stderr
  assert ('[distill] NOTE: mesh.fsdp=True applies to the teacher only: the '
          'distillation step keeps the student and its frozen source '
          'replicated on every device') in r.stdout
  from kforcing_jax import commands  # pylint: disable=g-import-not-at-top
  flags_obj = types.SimpleNamespace(
      workdir=str(tmp_path), k=1, seed=None, model='', prompt=['the'],
      config=None, max_new_tokens=40, temperature=None, greedy=None,
      readout=None, frequency_penalty=None)
  commands.generate(flags_obj)
  shown = capsys.readouterr()
  assert json.loads(shown.out)['model'] == 'teacher'
  assert 'NOTE: max_new_tokens=40 cut to' in shown.err
  assert 'the longest prompt has 1 token and' in shown.err  # Not '1 tokens'.
  # new_tokens counts a final eos, which the text does not show: said apart.
  from kforcing_jax import decode  # pylint: disable=g-import-not-at-top
  from kforcing_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  eos = tokenizer_lib.load_tokenizer(str(tmp_path / 'tokenizer.model')).eos_id
  real_generate = decode.generate
  for row, n, stopped in (([7, eos, 0], 2, True), ([7, 8, 9], 3, False)):
    made = types.SimpleNamespace(tokens=np.array([row]), lengths=np.array([n]))
    monkeypatch.setattr(decode, 'generate', lambda *a, m=made, **k: m)
    commands.generate(flags_obj)
    record = json.loads(capsys.readouterr().out)
    assert (record['new_tokens'], record['stopped_at_eos']) == (n, stopped)
  monkeypatch.setattr(decode, 'generate', real_generate)
  # --temperature next to --greedy was dropped without a word.
  commands.generate(types.SimpleNamespace(**dict(
      vars(flags_obj), greedy=True, temperature=0.5, max_new_tokens=2)))
  assert ('NOTE: --temperature=0.5 ignored: greedy decoding takes the '
          'argmax') in capsys.readouterr().err
  # The config's bad value named as the config's, not as the flag.
  config = types.SimpleNamespace(**vars(flags_obj))
  config.max_new_tokens = None
  config.config = config_files.load_config(os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
      'tiny.py'))
  config.config.decode.max_new_tokens = 0
  with pytest.raises(ValueError, match='decode.max_new_tokens=0 must be '
                     '>= 1'):
    commands.generate(config)
  # A bad --seed was checked as decode.seed (the config's, not the flag's).
  bad = dict(vars(flags_obj), seed=2**32)
  with pytest.raises(ValueError, match=r'--seed=4294967296 must be an int'):
    commands.generate(types.SimpleNamespace(**bad))
  monkeypatch.setattr(sharding, 'is_main_process', lambda: False)
  commands.generate(flags_obj)
  assert capsys.readouterr() == ('', '')


def test_commands_check_only_the_batches_they_use(tmp_path):
  # train-teacher never builds a distillation batch, and evaluate no
  # training batch: neither may be refused for one.
  r = _cli('train-teacher', '--config=configs/tiny.py',
           f'--workdir={tmp_path}', '--config.distill.batch_size=12',
           '--config.train.num_steps=1', '--config.train.eval_every=0')
  assert r.returncode == 0, r.stderr
  r = _cli('evaluate', '--config=configs/tiny.py', f'--workdir={tmp_path}/e',
           '--config.train.batch_size=12')
  assert 'not divisible' not in r.stderr and 'no checkpoint' in r.stderr


def test_missing_config_file_is_named(tmp_path):
  r = _cli('train-teacher', '--config=configs/nope.py',
           f'--workdir={tmp_path}')
  assert r.returncode == 2
  assert r.stderr == 'error: --config=configs/nope.py: no such file\n'


def test_config_file_argument(tmp_path):
  # ml_collections' `file.py:argument` form: the argument reaches
  # get_config, a config that takes none is one line (it was
  # ml_collections' traceback), and overrides are checked against the
  # config the argument makes.
  path = tmp_path / 'sized.py'
  path.write_text('from kforcing_jax import defaults\n'
                  'def get_config(size):\n'
                  '  c = defaults.base_config()\n'
                  '  c.name = size\n'
                  '  return c\n')
  r = _cli('train-teacher', f'--config={path}:bigger', '--config.nope=1',
           f'--workdir={tmp_path}/w')
  assert r.returncode == 2
  assert r.stderr.startswith('error: unknown config field(s): nope')
  r = _cli('train-teacher', '--config=configs/tiny.py:foo',
           f'--workdir={tmp_path}/w')
  assert r.returncode == 2
  assert r.stderr == ('error: --config=configs/tiny.py:foo: TypeError: '
                      'get_config() takes 0 positional arguments but 1 was '
                      'given\n')
  assert not (tmp_path / 'w').exists()
  assert config_files.load_config(f'{path}:bigger').name == 'bigger'


def test_config_files_load_as_ml_collections_loads_them(tmp_path):
  # The one-line pre-check refused configs ml_collections loads (a file
  # without .py, a dataclass under `from __future__ import annotations`),
  # split `file:argument` at the last ':' where ml_collections splits at
  # the first, and checked the first of two --config flags, absl the last.
  tiny = os.path.join('configs', 'tiny.py')  # Tests run from the root.
  plain = tmp_path / 'myconfig'
  plain.write_text(open(tiny).read())
  classy = tmp_path / 'classy.py'
  classy.write_text('from __future__ import annotations\n'
                    'import dataclasses\n'
                    'from kforcing_jax import defaults\n'
                    '@dataclasses.dataclass\n'
                    'class Size:\n'
                    '  width: int = 64\n'
                    'def get_config(name=""):\n'
                    '  c = defaults.base_config()\n'
                    '  c.model.d_model = Size().width\n'
                    '  c.name = name\n'
                    '  return c\n')
  for path in (plain, classy):
    assert config_files.check_file([f'--config={path}']) is None
  assert config_files.load_config(str(plain)) == config_files.load_config(
      tiny)
  loaded = config_files.load_config(f'{classy}:a:b')
  assert loaded.name == 'a:b' and loaded.model.d_model == 64
  (tmp_path / 'run:1').mkdir()
  colon = tmp_path / 'run:1' / 'tiny.py'
  colon.write_text(open(tiny).read())
  assert config_files.check_file([f'--config={colon}']) == (
      f"--config={colon}: no such file {tmp_path}/run (the text after the "
      "first ':' is get_config's argument)")
  # Of two --config flags absl keeps the last: the one checked and kept.
  assert config_files.config_first(
      ['prog', '--config=a.py', '--config.x=1', '--config', 'b.py']) == [
          'prog', '--config', 'b.py', '--config.x=1']
  r = _cli('train-teacher', '--config=configs/tiny.py',
           f'--config={tmp_path}/nope.py', f'--workdir={tmp_path}/w')
  assert r.returncode == 2
  assert r.stderr == f'error: --config={tmp_path}/nope.py: no such file\n'


def test_report_subcommand_writes_the_report_of_a_workdir(tmp_path):
  # report.md used to be written only at the end of a pipeline.
  r = _cli('report', f'--workdir={tmp_path}')
  assert r.returncode == 2
  assert r.stderr == (f'error: --workdir={tmp_path} holds no teacher, '
                      'eval.json or bench.json: nothing to report\n')
  assert not (tmp_path / 'report.md').exists()
  (tmp_path / 'teacher').mkdir()
  (tmp_path / 'teacher' / 'metrics.jsonl').write_text(
      json.dumps({'step': 4, 'loss': 1.0}) + '\n')
  r = _cli('report', f'--workdir={tmp_path}')
  assert r.returncode == 0, r.stderr
  assert r.stdout == f'[report] wrote {tmp_path}/report.md\n'
  assert '| teacher | 4 | none |' in (tmp_path / 'report.md').read_text()


def test_overrides_may_come_before_the_config_file_and_the_last_wins(
    tmp_path):
  # ml_collections refused them ("Found --config.x in argv before a value
  # for --config was specified"); the order means nothing to the result.
  # A repeated field means its last value: a repeated tuple joined them,
  # (1, 2, 1, 2, 4) here, refused as windows.
  r = _cli('train-teacher', '--config.train.num_steps=1',
           f'--workdir={tmp_path}', '--config=configs/tiny.py',
           '--config.train.eval_every=0', "--config.distill.windows=(1,2)",
           "--config.distill.windows=(1,2,4)")
  assert r.returncode == 0, r.stderr
  assert '"step": 1,' in r.stdout  # The summary JSON.
  assert config_files.last_override_wins(
      ['prog', '--config.a=(4,)', '--config.b=1', '--config.a=(2,)']) == [
          'prog', '--config.b=1', '--config.a=(2,)']
  assert config_files.config_first(
      ['prog', 'x', '--config.a=1', '--config', 'c.py', '--b']) == [
          'prog', '--config', 'c.py', 'x', '--config.a=1', '--b']


@pytest.mark.slow
def test_generate_applies_config_decode_overrides(tmp_path, monkeypatch):
  # The run's saved config gives the defaults; --config and its
  # --config.decode.* overrides replace them (they used to be ignored).
  r = _cli('train-teacher', '--config=configs/tiny.py', f'--workdir={tmp_path}',
           '--config.train.num_steps=2', '--config.train.eval_every=0')
  assert r.returncode == 0, r.stderr
  base = ('generate', f'--workdir={tmp_path}', '--prompt=the')
  # eos may end a row early, so lengths are checked as upper bounds; the
  # default run must get past 3 tokens for the override to be visible.
  saved = json.loads(_cli(*base).stdout)
  assert 3 < saved['new_tokens'] <= 16  # tiny: decode.max_new_tokens.
  runs = [_cli(*base, '--config=configs/tiny.py',
               '--config.decode.max_new_tokens=3',
               '--config.decode.greedy=True', f'--config.decode.seed={seed}')
          for seed in (0, 1)]
  assert not any('NOTE' in r.stderr for r in runs)  # Same model as trained.
  over = [json.loads(r.stdout) for r in runs]
  assert all(o['new_tokens'] <= 3 for o in over)
  assert over[0]['text'] == over[1]['text']  # Greedy: the seed is unused.
  # Model fields cannot change a trained run: said, not silently dropped.
  r = _cli(*base, '--config=configs/tiny.py', '--config.model.num_layers=3',
           '--config.model.dtype=bfloat16')
  assert r.returncode == 0, r.stderr
  assert ("NOTE: model.dtype='bfloat16', model.num_layers=3 ignored: "
          'teacher decodes as it was trained') in r.stderr
  r = _cli(*base, '--k=0')
  assert r.returncode == 2 and r.stderr == 'error: --k=0 must be >= 1\n'
  # A path would decode another run with this workdir's tokenizer.
  r = _cli(*base, '--model=../other/teacher')
  assert r.returncode == 2
  assert "--model='../other/teacher': expected 'teacher'" in r.stderr
  # More new tokens than the context has room for: cut, and said so.
  r = _cli(*base, '--max_new_tokens=500')
  assert r.returncode == 0, r.stderr
  assert 'NOTE: max_new_tokens=500 cut to ' in r.stderr
  assert json.loads(r.stdout)['new_tokens'] < 500
  # kernels.attention_impl reaches the decode (in process, to see it).
  from kforcing_jax import commands  # pylint: disable=g-import-not-at-top
  from kforcing_jax import decode  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.kernels.attention_impl = 'xla'
  seen = []
  real_generate = decode.generate

  def generate(*args, attention_impl='auto', **kwargs):
    seen.append(attention_impl)
    return real_generate(*args, attention_impl=attention_impl, **kwargs)
  flags_obj = types.SimpleNamespace(
      workdir=str(tmp_path), config=config, prompt=['the'], k=1, model=None,
      seed=None, max_new_tokens=2, temperature=None, greedy=None,
      readout=None, frequency_penalty=None)
  monkeypatch.setattr(decode, 'generate', generate)
  commands.generate(flags_obj)
  assert seen == ['xla']
  config.kernels.attention_impl = 'fast'  # Named, not DecodeSpec's field.
  with pytest.raises(ValueError, match="kernels.attention_impl='fast'"):
    commands.generate(flags_obj)
  assert seen == ['xla']
  # Without the run's tokenizer: refused (it trained a new one and decoded
  # with ids the run never saw).
  for name in ('tokenizer.model', 'tokenizer.sha256'):
    os.remove(tmp_path / name)
  r = _cli(*base)
  assert r.returncode == 2
  assert r.stderr == (f'error: {tmp_path} has no tokenizer.model, the '
                      'tokenizer teacher was trained with; generate decodes '
                      'only with it\n')
  assert not (tmp_path / 'tokenizer.model').exists()


def _cli_env(env, *args, timeout=60):
  return subprocess.run([sys.executable, '-m', 'kforcing_jax', *args],
                        capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, **env))


def test_help_does_not_wait_for_a_cluster():
  # Joining a cluster first made --help wait for a coordinator.
  r = _cli_env({'KFORCING_COORDINATOR': '10.255.255.1:1234',
                'KFORCING_NUM_PROCESSES': '2', 'KFORCING_PROCESS_ID': '1'},
               '--help', timeout=30)
  assert r.returncode == 0 and 'Subcommands' in r.stdout


def test_auto_join_without_a_cluster_names_the_variable(tmp_path):
  r = _cli_env({'KFORCING_DISTRIBUTED': 'auto'}, 'train-teacher',
               '--config=configs/tiny.py', f'--workdir={tmp_path}/w')
  assert r.returncode == 2
  assert r.stderr.startswith('error: KFORCING_DISTRIBUTED=auto, but JAX '
                             'found no cluster to join')
  assert len(r.stderr.strip().splitlines()) == 1


def test_a_damaged_checkpoint_error_is_the_last_thing_printed():
  # TensorStore threads of a failed restore kept printing "Event loop is
  # closed" tracebacks (up to ~1,200 lines) after the one-line error. Here
  # a thread stands in for them, writing to stderr without pause.
  script = '''
import sys, threading, time
from kforcing_jax import cli
from kforcing_jax import config_files
def spam():
  while True:
    sys.stderr.write("RuntimeError: Event loop is closed\\n")
    sys.stderr.flush()
threading.Thread(target=spam, daemon=True).start()
time.sleep(0.2)
cli._fail_now("checkpoint W/3 is unreadable")
'''
  r = subprocess.run([sys.executable, '-c', script], capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 2
  assert r.stderr.endswith('error: checkpoint W/3 is unreadable\n')


def test_checkpoint_errors_leave_through_the_quiet_exit(tmp_path):
  # main() sends every CheckpointError through _fail_now: one line, rc 2.
  r = _cli('generate', f'--workdir={tmp_path}')
  assert r.returncode == 2
  assert r.stderr == (f'error: no checkpoint found in {tmp_path}/teacher/'
                      'checkpoints; train it first\n')


def test_sigterm_outside_training_says_how_to_resume(tmp_path):
  # Training loops save and stop on SIGTERM themselves; evaluate and bench
  # used to die with no word. A stand-in subcommand waits to be signalled.
  script = '''
import sys, time
from kforcing_jax import cli
from kforcing_jax import config_files
def wait(flags_obj):
  print("ready", flush=True)
  # Short sleeps, as a running subcommand returns to Python often: a
  # signal taken by another thread (JAX's) is handled at the next one.
  for _ in range(1200):
    time.sleep(0.1)
cli.SUBCOMMANDS["bench"] = wait
sys.argv = ["kforcing_jax", "bench", "--workdir=%s"]
cli.main()
''' % tmp_path
  proc = subprocess.Popen([sys.executable, '-c', script],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == 'ready'
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 143
  assert err.endswith('terminated (SIGTERM); re-run the same command: '
                      'finished training stages and earlier results are '
                      'kept, and the stage that was stopped (evaluate, '
                      'bench, the evaluator) starts over\n')


@pytest.mark.parametrize('platform', ['bogus', 'cuda'])
def test_a_platform_jax_cannot_start_is_one_line_naming_it(tmp_path,
                                                          platform):
  # JAX_PLATFORMS naming a platform this machine lacks ended in jax's own
  # traceback ('cuda' without its plugin: a bare AssertionError).
  if platform == 'cuda' and any(importlib.util.find_spec(m) for m in (
      'jax_cuda12_plugin', 'jax_cuda13_plugin')):
    pytest.skip('this machine has a JAX CUDA plugin')
  r = _cli_env({'JAX_PLATFORMS': platform}, 'train-teacher',
               '--config=configs/tiny.py', f'--workdir={tmp_path / "w"}')
  assert r.returncode == 2
  assert 'Traceback' not in r.stderr
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error: JAX could not start its backend '
                         f"(JAX_PLATFORMS='{platform}')"), r.stderr


def test_out_of_memory_is_one_line_naming_the_batch_sizes():
  e = RuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 74897863280 '
                   'bytes.\nmore detail')
  message = cli.out_of_memory(e)
  assert message.startswith('out of memory: RESOURCE_EXHAUSTED: Out of memory '
                            'allocating 74897863280 bytes. Lower the batch')
  assert '\n' not in message and 'distill.batch_size' in message
  assert cli.out_of_memory(RuntimeError('INTERNAL: something else')) is None


def test_backend_failure_leaves_other_errors_alone():
  try:
    assert False, 'not a backend'
  except AssertionError as e:
    assert sharding.backend_failure(e) is None



@pytest.mark.parametrize('command', ['pipeline', 'generate'])
def test_pallas_vocabulary_kernels_on_a_gpu_are_refused_up_front(
    tmp_path, monkeypatch, command):
  # They have no GPU lowering: the pipeline trained the teacher, then
  # stopped at the first distillation step with a traceback.
  from kforcing_jax import commands
  from kforcing_jax import defaults
  from kforcing_jax.kernels import _common
  from kforcing_jax import pipeline
  monkeypatch.setattr(_common, 'backend', lambda: 'gpu')
  monkeypatch.setattr(pipeline, 'run_pipeline', _must_not_run)
  config = defaults.base_config()
  config.kernels.impl = 'pallas'
  flags_obj = types.SimpleNamespace(
      config=config, workdir=str(tmp_path), k=1, seed=None, model='',
      prompt=None)
  if command == 'generate':  # It refuses after loading the run's config.
    monkeypatch.setattr(commands, 'pick_run', lambda *a: 'teacher')
    monkeypatch.setattr(commands.checkpoints, 'load_params', lambda path: (
        None, None, {'config': config.to_dict()}))
    monkeypatch.setattr(commands.data_lib, 'get_tokenizer',
                        lambda *a, **k: None)
    monkeypatch.setattr(commands, '_note_ignored_model_fields',
                        lambda *a: None)
    (tmp_path / 'tokenizer.model').write_text('')
  run = getattr(commands, f'{command}_cmd', None) or getattr(commands,
                                                              command)
  with pytest.raises(ValueError, match="kernels.impl='pallas': the "
                     'vocabulary kernels target TPU'):
    run(flags_obj)
  assert sorted(os.listdir(tmp_path)) == (
      ['tokenizer.model'] if command == 'generate' else [])
  config.kernels.impl = 'auto'  # Resolved per backend: not refused.
  defaults.check_kernel_backend(config)


def _must_not_run(*args, **kwargs):
  raise AssertionError('ran although it should have been refused')
