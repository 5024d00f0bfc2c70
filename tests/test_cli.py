"""The command line's help and usage errors (subprocesses: real argv)."""

import subprocess
import sys

import pytest

from kforcing_jax import cli


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
])
def test_usage_errors_exit_2_and_point_at_help(args, needle):
  r = _cli(*args)
  assert r.returncode == 2
  assert r.stderr.startswith('error: ')
  assert needle in r.stderr
  assert 'python -m kforcing_jax --help' in r.stderr
