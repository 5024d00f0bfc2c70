"""Tests of launch/: the TPU pod helper and the local multi-process script.

Nothing here reaches a cloud: tpu_pod.py runs with --dry-run, or with a fake
`gcloud` first on PATH; the remote shell scripts it builds run in a temporary
HOME with a fake interpreter; local_multiprocess.sh runs a fake interpreter.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(ROOT, 'launch', 'tpu_pod.py')
LOCAL_MP = os.path.join(ROOT, 'launch', 'local_multiprocess.sh')

POD = ['--name=kf-pod', '--zone=us-central1-a']
KF_ARGS = ['train-teacher', '--config=configs/demo.py', '--workdir=/mnt/kf',
           '--config.train.num_steps=1000', "--prompt=Hello 'big' \"$world\""]


def _write_exe(path, text):
  path.write_text(textwrap.dedent(text).lstrip())
  path.chmod(0o755)
  return path


@pytest.fixture
def fake_bin(tmp_path):
  """A PATH folder whose `gcloud` logs its argv and fails on FAIL_VERB."""
  folder = tmp_path / 'bin'
  folder.mkdir()
  _write_exe(folder / 'gcloud', f"""
      #!{sys.executable}
      import json, os, sys
      with open(os.environ['GCLOUD_LOG'], 'a') as f:
        f.write(json.dumps(sys.argv[1:]) + '\\n')
      sys.exit(7 if os.environ.get('FAIL_VERB') in sys.argv[1:] else 0)
      """)
  return folder


def pod(*args, env=None, tmp_path=None):
  """Runs tpu_pod.py; PATH has no gcloud unless `env` says otherwise."""
  run_env = dict(os.environ)
  run_env['PATH'] = os.path.dirname(sys.executable)  # No gcloud here.
  if tmp_path is not None:
    run_env['TMPDIR'] = str(tmp_path)  # Where copy stages the repo.
  run_env.update(env or {})
  return subprocess.run([sys.executable, TPU_POD, *args], env=run_env,
                        capture_output=True, text=True, timeout=60)


def shell_words(text: str) -> list[str]:
  """The words bash makes of `text` (shlex leaves \\$ escaped in "...")."""
  out = subprocess.run(['bash', '-c', f"printf '%s\\0' {text}"],
                       capture_output=True, text=True, check=True).stdout
  return out.split('\0')[:-1]


def remote_script(line: str) -> str:
  """The shell script of a printed `gcloud ... ssh ... --command=S` line."""
  words = shlex.split(line)
  (command,) = [w for w in words if w.startswith('--command=')]
  return command[len('--command='):]


# ------------------------------------------------------------ tpu_pod.py


def test_all_dry_run_prints_every_step_and_runs_nothing(tmp_path, fake_bin):
  log = tmp_path / 'gcloud.log'
  r = pod('all', '--dry-run', *POD, '--accelerator-type=v5litepod-16',
          '--spot', '--project=my-proj', '--', *KF_ARGS, tmp_path=tmp_path,
          env={'PATH': f'{fake_bin}{os.pathsep}{os.environ["PATH"]}',
               'GCLOUD_LOG': str(log)})
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert len(lines) == 6, r.stdout
  create, stage, scp, install, check, run = lines
  assert not log.exists()  # gcloud was never called,
  assert not list(tmp_path.glob('kforcing_pod_stage_*'))  # nor staged.

  words = shlex.split(create)
  assert words[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create',
                       'kf-pod']
  for flag in ('--zone=us-central1-a', '--accelerator-type=v5litepod-16',
               '--version=v2-alpha-tpuv5-lite', '--spot',
               '--project=my-proj'):
    assert flag in words
  assert '--preemptible' not in words

  assert stage.startswith('# stage ')
  words = shlex.split(scp)
  assert words[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert {'--recurse', '--worker=all', '--zone=us-central1-a',
          '--project=my-proj'} <= set(words)
  assert words[-1] == 'kf-pod:'
  assert words[-2].endswith(os.sep + 'kforcing_jax')

  for line in (install, check, run):
    words = shlex.split(line)
    assert words[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh',
                         'kf-pod']
    assert {'--worker=all', '--zone=us-central1-a',
            '--project=my-proj'} <= set(words)
  assert 'pip install' in remote_script(install)
  assert '".[demo]" "jax[tpu]"' in remote_script(install)
  # A given --pip-package replaces jax[tpu] (it was added to it).
  pinned = pod('install', '--dry-run', *POD, '--pip-package=jax[tpu]==0.10.2',
               tmp_path=tmp_path)
  assert pinned.returncode == 0, pinned.stderr
  assert '".[demo]" "jax[tpu]==0.10.2"; ' in remote_script(pinned.stdout)
  assert 'nohup' not in remote_script(check)  # It starts nothing.
  script = remote_script(run)
  assert 'nohup ' in script
  assert '"$HOME/kforcing_logs/train-teacher.log"' in script
  # The kforcing_jax command survives both levels of quoting.
  assert '-m kforcing_jax train-teacher --config=configs/demo.py' in script
  after_module = script.split('-m kforcing_jax ', 1)[1].split(' >> ', 1)[0]
  assert shell_words(after_module) == KF_ARGS


def _exited(pid: int) -> bool:
  """Gone, or a zombie its parent has yet to reap (here, with no init
  reaping orphans, it may stay one)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  with open(f'/proc/{pid}/status') as f:
    return any(line.split()[1:2] == ['Z'] for line in f
               if line.startswith('State:'))


def test_a_pid_file_naming_another_process_is_not_a_running_run(tmp_path):
  # A pid file outlives its run; its pid may since name another process,
  # which `stop` used to SIGTERM and `run` took for the run still going.
  home = tmp_path / 'home'
  (home / 'kforcing_logs').mkdir(parents=True)
  other = subprocess.Popen(['sleep', '60'])
  try:
    (home / 'kforcing_logs' / 'train-teacher.pid').write_text(str(other.pid))
    r = pod('stop', '--dry-run', *POD, '--run-name=train-teacher')
    out = subprocess.run(['bash', '-c', remote_script(r.stdout.strip())],
                         env=dict(os.environ, HOME=str(home)),
                         capture_output=True, text=True, timeout=30)
    assert 'train-teacher is not running' in out.stdout, out.stderr
    assert other.poll() is None  # Not signalled.
    r = pod('run', '--dry-run', *POD, '--', *KF_ARGS)
    for line in r.stdout.splitlines():  # The check, then the start.
      out = subprocess.run(['bash', '-c', remote_script(line)],
                           env=dict(os.environ, HOME=str(home)),
                           capture_output=True, text=True, timeout=30)
      assert 'already running' not in out.stderr
  finally:
    other.kill()
    other.wait()


def test_run_without_install_says_so(tmp_path):
  # It used to print "started ... pid N" for a process that died at once.
  home = tmp_path / 'home'
  (home / 'kforcing_jax').mkdir(parents=True)
  r = pod('run', '--dry-run', *POD, '--', *KF_ARGS)
  for line in r.stdout.splitlines():  # The check, then the start.
    out = subprocess.run(['bash', '-c', remote_script(line)],
                         env=dict(os.environ, HOME=str(home)),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert 'run install first' in out.stderr
    assert 'started' not in out.stdout and 'can start' not in out.stdout
  assert not (home / 'kforcing_logs' / 'train-teacher.pid').exists()


def test_remote_scripts_run_and_stop(tmp_path):
  """The run/stop/logs/install scripts, run by bash in a fake $HOME."""
  home = tmp_path / 'home'
  (home / 'kforcing_jax').mkdir(parents=True)
  (home / 'kforcing_venv' / 'bin').mkdir(parents=True)
  _write_exe(home / 'kforcing_venv' / 'bin' / 'python', f"""
      #!{sys.executable}
      import json, os, sys, time
      with open(os.path.join(os.environ['HOME'], 'argv.json'), 'w') as f:
        json.dump({{'argv': sys.argv[1:], 'cwd': os.getcwd(),
                   'A': os.environ.get('A')}}, f)
      import signal

      def save_and_exit(*_):  # As training does: save, then exit.
        time.sleep(2)
        open(os.path.join(os.environ['HOME'], 'saved'), 'w').close()
        sys.exit(0)

      signal.signal(signal.SIGTERM, save_and_exit)
      print('training...', flush=True)
      time.sleep(60)
      """)
  env = dict(os.environ, HOME=str(home))

  def bash(script):
    return subprocess.run(['bash', '-c', script], env=env, capture_output=True,
                          text=True, timeout=30)

  r = pod('run', '--dry-run', *POD, '--env', 'A=b c', '--', *KF_ARGS)
  assert r.returncode == 0, r.stderr
  check_script, run_script = map(remote_script, r.stdout.splitlines())
  out = bash(check_script)
  assert out.returncode == 0, out.stderr
  assert 'train-teacher can start on' in out.stdout
  assert not (home / 'kforcing_logs').exists()  # It starts nothing.
  out = bash(run_script)
  assert out.returncode == 0, out.stderr
  assert 'started train-teacher' in out.stdout
  argv_file = home / 'argv.json'
  for _ in range(100):
    if argv_file.exists() and argv_file.stat().st_size:
      break
    time.sleep(0.1)
  got = json.loads(argv_file.read_text())
  assert got == {'argv': ['-m', 'kforcing_jax', *KF_ARGS],
                 'cwd': str(home / 'kforcing_jax'), 'A': 'b c'}
  pid = int((home / 'kforcing_logs' / 'train-teacher.pid').read_text())
  try:
    # A second start of the same run is refused while it is alive, by
    # the check that runs on every worker before any starts, and again by
    # the start itself.
    for script in (check_script, run_script):
      again = bash(script)
      assert again.returncode != 0
      assert 'already running' in again.stderr

    r = pod('logs', '--dry-run', *POD, '--run-name=train-teacher',
            '--no-follow')
    out = bash(remote_script(r.stdout.strip()))
    assert 'training...' in out.stdout

    r = pod('stop', '--dry-run', *POD, '--run-name=train-teacher')
    out = bash(remote_script(r.stdout.strip()))
    assert 'sent SIGTERM to train-teacher' in out.stdout
    # stop returns once the run has saved and exited, not before: a
    # `delete` right after it must not lose the save.
    assert 'train-teacher exited' in out.stdout, out.stderr
    assert (home / 'saved').exists()
    assert _exited(pid)
    out = bash(remote_script(r.stdout.strip()))
    assert 'train-teacher is not running' in out.stdout

    # A restart appends to the log: the first segment's lines stay.
    out = bash(run_script)
    assert out.returncode == 0, out.stderr
    pid = int((home / 'kforcing_logs' / 'train-teacher.pid').read_text())
    log = home / 'kforcing_logs' / 'train-teacher.log'
    for _ in range(100):
      if log.read_text().count('training...') == 2:
        break
      time.sleep(0.1)
    assert log.read_text().count('=== ') == 2
    assert log.read_text().count('training...') == 2
  finally:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass

  r = pod('install', '--dry-run', *POD)
  syntax = subprocess.run(['bash', '-n', '-c', remote_script(r.stdout)],
                          capture_output=True, text=True)
  assert syntax.returncode == 0, syntax.stderr


@pytest.mark.parametrize('accelerator,version', [
    ('v4-32', 'tpu-ubuntu2204-base'),
    ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v5p-8', 'v2-alpha-tpuv5'),
    ('v6e-16', 'v2-alpha-tpuv6e'),
])
def test_create_default_runtime_version(accelerator, version):
  r = pod('create', '--dry-run', *POD, f'--accelerator-type={accelerator}',
          '--preemptible')
  assert r.returncode == 0, r.stderr
  words = shlex.split(r.stdout)
  assert f'--version={version}' in words
  assert '--preemptible' in words and '--spot' not in words
  assert '--project' not in r.stdout  # Only when given.


def test_other_subcommands_dry_run():
  r = pod('logs', '--dry-run', *POD, '--run-name=distill', '--worker=3')
  assert r.returncode == 0, r.stderr
  words = shlex.split(r.stdout)
  assert words[4] == 'ssh' and '--worker=3' in words
  assert remote_script(r.stdout) == (
      'tail -n 100 -F "$HOME/kforcing_logs/distill.log"')
  r = pod('logs', '--dry-run', *POD, '--run-name=distill')
  assert '--worker=0' in shlex.split(r.stdout)

  r = pod('stop', '--dry-run', *POD, '--run-name=distill', '--signal=KILL')
  assert '--worker=all' in shlex.split(r.stdout)
  assert 'kill -KILL' in remote_script(r.stdout)

  r = pod('delete', '--dry-run', *POD)
  assert shlex.split(r.stdout) == [
      'gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'kf-pod',
      '--zone=us-central1-a']
  r = pod('delete', '--dry-run', *POD, '--yes')
  assert shlex.split(r.stdout)[-1] == '--quiet'

  r = pod('create', '--dry-run', *POD, '--accelerator-type=v9-8',
          '--version=some-runtime')
  assert '--version=some-runtime' in shlex.split(r.stdout)


def test_run_accepts_every_cli_subcommand():
  # tpu_pod.py keeps its own list (it must not import jax): the same set.
  from kforcing_jax import cli
  for name in cli.SUBCOMMANDS:
    r = pod('run', '--dry-run', *POD, '--', name, '--workdir=w')
    assert r.returncode == 0, (name, r.stderr)
    assert f'-m kforcing_jax {name} --workdir=w' in r.stdout
  r = pod('run', '--dry-run', *POD, '--', 'train', '--workdir=w')
  listed = r.stderr.split('(subcommands: ')[1].split(')')[0].split(', ')
  assert sorted(listed) == sorted(cli.SUBCOMMANDS)


@pytest.mark.parametrize('args,message', [
    (['create', '--zone=us-central1-a', '--accelerator-type=v4-8'],
     '--name'),
    (['create', *POD, '--accelerator-type=tpu-v4'], 'FAMILY-SIZE'),
    (['create', *POD, '--accelerator-type=a100'], 'FAMILY-SIZE'),
    (['create', *POD, '--accelerator-type=v9-8'], 'no default --version'),
    # It asked for --version, which only moved the failure to gcloud.
    (['create', *POD, '--accelerator-type=v5e-8'],
     "--accelerator-type='v5e-8': Cloud TPU names v5e slices v5litepod-N, "
     'e.g. v5litepod-8'),
    (['create', *POD, '--accelerator-type=v4-8', '--spot', '--preemptible'],
     'not allowed with'),
    (['create', '--name=Bad_Name', '--zone=us-central1-a',
      '--accelerator-type=v4-8'], '--name'),
    (['create', '--name=kf', '--zone=uscentral', '--accelerator-type=v4-8'],
     '--zone'),
    (['run', *POD], 'expected a kforcing_jax command'),
    (['run', *POD, '--', 'train', '--workdir=w'],
     'expected a kforcing_jax command'),
    (['run', *POD, '--', 'distill', '--config=configs/demo.py'],
     '--workdir'),
    (['run', *POD, '--env=1A=b', '--', 'distill', '--workdir=w'],
     "--env='1A=b': expected KEY=VALUE"),
    (['all', *POD, '--accelerator-type=v4-8', '--', 'distill',
      '--workdir=gs://b/kf'], '--workdir=gs://b/kf is a URL'),
    (['run', *POD, '--', 'distill', '--workdir', 'gs://b/kf'],
     '--workdir=gs://b/kf is a URL'),
    # Quoted for the workers' shell, so nothing expanded it there.
    (['run', *POD, '--', 'distill', '--workdir=$HOME/kf'],
     '--workdir=$HOME/kf: the workers get it as written'),
    (['run', *POD, '--env=JAX_COMPILATION_CACHE_DIR=$HOME/c', '--',
      'distill', '--workdir=/w'], 'the workers get the value as written'),
    (['run', *POD, '--', 'distill', '--workdir=w', '--dry-run'],
     '--dry-run comes after `--`'),
    (['all', *POD, '--accelerator-type=v4-8', '--', 'distill', '--workdir=w',
      '--zone=us-east1-b'], '--zone=us-east1-b comes after'),
    # kforcing_jax's flags before `--`: argparse said only "unrecognized".
    (['run', *POD, '--workdir=/w', '--', 'train-teacher'],
     '--workdir=/w is a kforcing_jax flag: put it after `--`'),
    (['all', *POD, '--accelerator-type=v4-8', '--config.train.lr=1', '--',
      'distill', '--workdir=/w'],
     '--config.train.lr=1 is a kforcing_jax flag: put it after `--`'),
    (['run', *POD, '--bogus', '--', 'distill', '--workdir=/w'],
     'unrecognized arguments: --bogus'),
    (['stop', *POD, '--run-name=x', '--signal=INT'], 'invalid choice'),
    (['stop', *POD, '--run-name=x', '--wait=-1'], '--wait=-1'),
    (['logs', *POD], '--run-name is required'),
    (['logs', *POD, '--run-name=x', '--worker=first'], '--worker'),
    (['launch', *POD], 'invalid choice'),
])
def test_bad_input_exits_2_with_a_clear_message(args, message):
  r = pod(*args, '--dry-run')
  assert r.returncode == 2, (r.stdout, r.stderr)
  assert message in r.stderr
  assert r.stdout == ''


def test_tpu_pod_knows_the_cli_flags():
  # Its "is a kforcing_jax flag" message needs the CLI's flag names.
  # pylint: disable=g-import-not-at-top
  import importlib.util
  from absl import flags
  from kforcing_jax import cli
  spec = importlib.util.spec_from_file_location('tpu_pod', TPU_POD)
  tpu_pod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tpu_pod)
  names = {'--' + f.name
           for f in flags.FLAGS.flags_by_module_dict()[cli.__name__]}
  assert tpu_pod._KFORCING_FLAGS == names | {'--nogreedy'}  # pylint: disable=protected-access


def test_a_multi_host_slice_joins_its_hosts_and_is_warned_of_the_rest():
  # Accepted in silence: no distributed setting (each host ran alone,
  # every one writing the result files), a workdir local to each host.
  # The CLI learns of both only on the workers.
  kf = ['--', 'train-teacher', '--config=configs/lm1b.py',
        '--workdir=workdirs/kf']
  r = pod('all', '--dry-run', *POD, '--accelerator-type=v4-32', *kf)
  assert r.returncode == 0, r.stderr
  assert r.stderr == (
      'NOTE: v4-32 has several hosts: added --env KFORCING_DISTRIBUTED=auto '
      'so that they join one JAX run (--env KFORCING_DISTRIBUTED=off keeps '
      'them apart)\n'
      'NOTE: --workdir=workdirs/kf is relative: each host would write its '
      'own ~/kforcing_jax/workdirs/kf, and a multi-host run needs one folder '
      'every host sees (an NFS or gcsfuse mount); the CLI refuses it on the '
      'workers\n')
  run_line = [l for l in r.stdout.splitlines() if 'nohup' in l]
  assert run_line and 'KFORCING_DISTRIBUTED=auto' in run_line[0]
  for given in ('auto', 'off'):
    r = pod('all', '--dry-run', *POD, '--accelerator-type=v4-32',
            f'--env=KFORCING_DISTRIBUTED={given}', *kf[:-1],
            '--workdir=/mnt/kf')
    assert r.returncode == 0 and r.stderr == '', r.stderr
    assert (f'KFORCING_DISTRIBUTED={"off" if given == "auto" else "auto"}'
            not in r.stdout)
  r = pod('all', '--dry-run', *POD, '--accelerator-type=v4-8', *kf)
  assert r.returncode == 0 and r.stderr == '', r.stderr  # One host.
  assert 'KFORCING_DISTRIBUTED' not in r.stdout
  r = pod('all', '--dry-run', *POD, '--accelerator-type=v4-32', *kf[:-1],
          '--workdir=~/kf')  # Each host's own home.
  assert 'NOTE: --workdir=~/kf is relative' in r.stderr


@pytest.mark.parametrize('args, message', [
    (['--workdir='], '--workdir needs a value'),
    (['--workdir'], '--workdir needs a value'),
    (['--workdir=/mnt/kf', '--config=configs/nope.py'],
     '--config=configs/nope.py: no configs/nope.py under --source='),
    (['--workdir=/mnt/kf', '--config', 'configs/nope.py:arg'],
     '--config=configs/nope.py:arg: no configs/nope.py under --source='),
])
def test_mistakes_the_workers_would_meet_are_refused_here(args, message):
  # All passed the dry run; the CLI refused them only on the workers,
  # after create, copy and install.
  r = pod('all', '--dry-run', *POD, '--accelerator-type=v4-8', '--',
          'train-teacher', *args)
  assert r.returncode == 2, (r.stdout, r.stderr)
  assert message in r.stderr
  r = pod('all', '--dry-run', *POD, '--accelerator-type=v4-8',
          '--env=KFORCING_DISTRIBUTED=yes', '--', 'train-teacher',
          '--workdir=/mnt/kf', '--config=configs/tiny.py')
  assert r.returncode == 2
  assert ("--env='KFORCING_DISTRIBUTED=yes': expected KFORCING_DISTRIBUTED="
          'auto or off') in r.stderr


def test_runs_steps_and_stops_at_the_first_failure(tmp_path, fake_bin):
  # A small "repository" to stage and copy.
  source = tmp_path / 'repo'
  for rel in ('kforcing_jax/__init__.py', 'configs/tiny.py',
              'configs/demo.py', '.git/HEAD',
              'kforcing_jax/__pycache__/x.pyc', 'workdirs/run/ckpt'):
    (source / rel).parent.mkdir(parents=True, exist_ok=True)
    (source / rel).write_text('x')
  log = tmp_path / 'gcloud.log'
  env = {'PATH': f'{fake_bin}{os.pathsep}{os.environ["PATH"]}',
         'GCLOUD_LOG': str(log), 'FAIL_VERB': 'scp'}
  r = pod('all', *POD, '--accelerator-type=v4-8', f'--source={source}', '--',
          *KF_ARGS, env=env, tmp_path=tmp_path)
  assert r.returncode == 1
  assert 'error: step 3/6 failed with exit status 7' in r.stderr
  assert 'later steps were not run' in r.stderr
  calls = [json.loads(line) for line in log.read_text().splitlines()]
  assert [c[3] for c in calls] == ['create', 'scp']  # No ssh after the fail.
  (staged,) = tmp_path.glob('kforcing_pod_stage_*/kforcing_jax')
  files = sorted(str(p.relative_to(staged)) for p in staged.rglob('*')
                 if p.is_file())
  assert files == ['configs/demo.py', 'configs/tiny.py',
                   'kforcing_jax/__init__.py']

  env['FAIL_VERB'] = 'none'
  log.unlink()
  r = pod('stop', *POD, '--run-name=train-teacher', env=env)
  assert r.returncode == 0, r.stderr
  assert json.loads(log.read_text())[3] == 'ssh'


def test_missing_gcloud_is_a_clear_error():
  r = pod('delete', *POD)  # PATH without gcloud, not a dry run.
  assert r.returncode == 1
  assert 'gcloud not found on PATH' in r.stderr


# ------------------------------------------------------------ local script


def local(*args, env=None, timeout=60):
  return subprocess.run(['bash', LOCAL_MP, *args],
                        env=dict(os.environ, **(env or {})),
                        capture_output=True, text=True, timeout=timeout)


def test_local_dry_run_prints_env_per_process():
  r = local('--dry-run', '-n', '3', '-p', '5432', '--', *KF_ARGS,
            env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8 '
                              '--xla_dump_to=/tmp/d', 'PYTHON': 'python3'})
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    words = shlex.split(line)
    assert words[0] == 'env'
    cut = words.index('python3')
    env = dict(w.split('=', 1) for w in words[1:cut])
    assert env['KFORCING_COORDINATOR'] == '127.0.0.1:5432'
    assert env['KFORCING_NUM_PROCESSES'] == '3'
    assert env['KFORCING_PROCESS_ID'] == str(i)
    assert env['JAX_PLATFORMS'] == 'cpu'
    assert env['XLA_FLAGS'] == ('--xla_dump_to=/tmp/d '
                                '--xla_force_host_platform_device_count=4')
    assert env['PYTHONPATH'].split(os.pathsep)[0] == ROOT
    assert words[cut:] == ['python3', '-m', 'kforcing_jax', *KF_ARGS]


@pytest.fixture
def fake_python(tmp_path):
  """Prints its rank and args; FAIL_ID fails, SLEEP_S sleeps, then exits."""
  return _write_exe(tmp_path / 'python', """
      #!/usr/bin/env bash
      echo "id=$KFORCING_PROCESS_ID of $KFORCING_NUM_PROCESSES args=$*"
      echo "from stderr" >&2
      if [[ "${FAIL_ID:-}" == "$KFORCING_PROCESS_ID" ]]; then exit 3; fi
      sleep "${SLEEP_S:-0}"
      printf 'last line without newline'
      """)


def test_local_runs_all_processes_with_prefixed_output(fake_python):
  r = local('-n', '2', '--', 'generate', '--workdir=w', '--prompt=a b',
            env={'PYTHON': str(fake_python)})
  assert r.returncode == 0, r.stdout + r.stderr
  lines = r.stdout.splitlines()
  for i in (0, 1):
    assert f'[p{i}] id={i} of 2 args=-m kforcing_jax generate --workdir=w ' \
           '--prompt=a b' in lines
    assert f'[p{i}] from stderr' in lines
    assert f'[p{i}] last line without newline' in lines
  assert all(line.startswith(('[p0] ', '[p1] ')) for line in lines)


def test_local_failure_stops_the_others(fake_python):
  r = local('-n', '3', '--', 'distill', '--workdir=w',
            env={'PYTHON': str(fake_python), 'FAIL_ID': '1',
                 'SLEEP_S': '50'})
  assert r.returncode == 3
  assert 'process 1 failed with exit status 3' in r.stderr
  # The sleeping ones were stopped (maybe before their first line): they
  # never reached their last one, which waited for they print at 50 s.
  for i in (0, 2):
    assert f'[p{i}] last line without newline' not in r.stdout


def test_local_waits_for_the_others_after_one_stops_with_143(tmp_path):
  """143 is a training process that a SIGTERM stopped after saving; the
  others stop at the same step and save their part. Taken for a failure,
  they got 5 s before SIGKILL, mid-save."""
  saver = _write_exe(tmp_path / 'python', """
      #!/usr/bin/env bash
      if [[ "$KFORCING_PROCESS_ID" == 1 ]]; then exit 143; fi
      sleep 8
      echo saved > "$SAVED/p$KFORCING_PROCESS_ID"
      exit 143
      """)
  r = local('-n', '2', '--', 'train-teacher', '--workdir=w', timeout=60,
            env={'PYTHON': str(saver), 'SAVED': str(tmp_path)})
  assert r.returncode == 143, r.stderr
  assert (tmp_path / 'p0').read_text() == 'saved\n'
  assert 'failed' not in r.stderr and 'SIGKILL' not in r.stderr
  assert 'stopped by SIGTERM (training saves first)' in r.stderr


def test_local_exits_143_on_its_own_sigterm(fake_python):
  # It exited 130, a user's cancel to some schedulers, not a preemption.
  proc = subprocess.Popen(
      ['bash', LOCAL_MP, '-n', '2', '-g', '2', '--', 'distill', '--workdir=w'],
      env=dict(os.environ, PYTHON=str(fake_python), SLEEP_S='60'),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  # The traps are set before any process starts: a process's first line
  # means they are in place.
  assert proc.stdout.readline().startswith(('[p0] id=', '[p1] id='))
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 143, err
  assert '[launch] terminated (SIGTERM); stopping all processes' in err


def _processes_running(*argv):
  """Pids of this machine's processes whose command line is exactly argv."""
  want = '\0'.join(argv) + '\0'
  found = []
  for entry in os.listdir('/proc'):
    try:
      with open(f'/proc/{entry}/cmdline') as f:
        if f.read() == want:
          found.append(int(entry))
    except (OSError, ValueError):
      continue  # Not a process, or it exited meanwhile.
  return found


def test_local_sigterm_while_processes_start_stops_every_one(tmp_path):
  """A SIGTERM while the processes start (here at the first line of
  output, before the last of 12 has started) is held until every pid is
  recorded, then stops them all: dropped, the launcher runs on until the
  processes end. (The race that made it wait, a process started but not yet
  recorded when the signal came, is too narrow to hit on purpose.)"""
  sleeper = _write_exe(tmp_path / 'python', """
      #!/usr/bin/env bash
      echo started
      exec sleep "$SLEEP_FOR"
      """)
  for attempt in range(3):
    # A duration no other process uses marks this attempt's sleepers.
    sleep_for = f'59.{os.getpid()}{attempt}'
    proc = subprocess.Popen(
        ['bash', LOCAL_MP, '-n', '12', '-g', '5', '--', 'distill',
         '--workdir=w'],
        env=dict(os.environ, PYTHON=str(sleeper), SLEEP_FOR=sleep_for),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith('[p')
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    # No "SIGKILL not in err": a TERM that reaches a process between its
    # fork and its exec is lost (CI saw one), and the grace's SIGKILL ends it.
    for _ in range(50):  # Init reaps them once the launcher is gone.
      if not _processes_running('sleep', sleep_for):
        break
      time.sleep(0.1)
    else:
      pytest.fail(f'processes outlived the launcher: {err}')


def test_local_stops_the_others_a_grace_period_after_a_143(tmp_path):
  """Outside training a 143 saved nothing, and the others may wait for
  the stopped process in a collective: they get the grace period, then
  are stopped, not waited for until the timeout."""
  hung = _write_exe(tmp_path / 'python', """
      #!/usr/bin/env bash
      if [[ "$KFORCING_PROCESS_ID" == 1 ]]; then exit 143; fi
      sleep 50
      touch "$DONE"
      """)
  done = tmp_path / 'waited_for'
  r = local('-n', '2', '-g', '2', '--', 'evaluate', '--workdir=w',
            timeout=60, env={'PYTHON': str(hung), 'DONE': str(done)})
  assert r.returncode == 143, r.stderr
  assert 'still running 2s after one was stopped by SIGTERM' in r.stderr
  assert not done.exists()  # Stopped, not waited for.


def test_local_failure_before_the_others_start_does_not_hang(fake_python):
  """Process 0 fails while later ones may not have opened their output pipe.

  A process stopped before its redirection opened its FIFO once left that
  FIFO's reader blocked forever (about 2 in 3 runs of this shape hung). The
  race is timing-dependent, so it is tried a few times.
  """
  for _ in range(4):
    r = local('-n', '8', '--', 'distill', '--workdir=w', timeout=30,
              env={'PYTHON': str(fake_python), 'FAIL_ID': '0',
                   'SLEEP_S': '60'})
    assert r.returncode == 3, r.stderr
    assert 'process 0 failed with exit status 3' in r.stderr


def test_local_timeout(fake_python):
  r = local('-t', '1', '--', 'distill', '--workdir=w',
            env={'PYTHON': str(fake_python), 'SLEEP_S': '60'})
  assert r.returncode == 124
  assert 'timeout after 1s' in r.stderr


def test_local_timeout_gives_processes_the_grace_period_to_save(tmp_path):
  """Training saves on SIGTERM only at its next log_every step; a 5 s
  grace used to SIGKILL the processes mid-save."""
  slow_saver = _write_exe(tmp_path / 'python', """
      #!/usr/bin/env bash
      trap 'sleep 7; echo saved > "$SAVED/p$KFORCING_PROCESS_ID"; exit 0' TERM
      echo started
      sleep 60 & wait $!
      """)
  # Not -t 1: bash's SECONDS counts wall-clock second boundaries, so a 1 s
  # timeout can fire milliseconds after the start, before a loaded machine
  # has run the fake's trap line (seen once in a full parallel run).
  r = local('-n', '2', '-t', '3', '-g', '40', '--', 'train-teacher',
            '--workdir=w', timeout=90,
            env={'PYTHON': str(slow_saver), 'SAVED': str(tmp_path)})
  assert r.returncode == 124, r.stderr
  assert 'waiting up to 40s' in r.stderr
  assert 'SIGKILL' not in r.stderr
  for i in (0, 1):
    assert (tmp_path / f'p{i}').read_text() == 'saved\n'


@pytest.mark.parametrize('args', [
    ['-n', '0', 'generate'], ['-d', 'x', 'generate'], ['-p', '70000',
                                                       'generate'],
    ['-g', '-1', 'generate'], ['--grace', 'x', 'generate'],
    ['--bogus', 'generate'], [],
    ['-n', '010', 'generate'],  # Octal to bash arithmetic: refused.
    # 2^64 + 1 wrapped to 1 in bash's arithmetic and was accepted.
    ['-n', '18446744073709551617', 'generate'],
])
def test_local_bad_input_exits_2(args):
  r = local(*args, '--dry-run')
  assert r.returncode == 2
  assert r.stderr.startswith('error: ')


def test_local_script_refuses_a_shell_other_than_bash_4():
  # mapfile and associative arrays need bash >= 4; a POSIX shell (or
  # macOS's bash 3.2) used to fail part-way with a syntax error.
  sh = shutil.which('dash') or shutil.which('sh')
  if sh is None or subprocess.run(
      [sh, '-c', 'echo "${BASH_VERSION:-}"'], capture_output=True,
      text=True, check=True).stdout.strip():
    pytest.skip('no POSIX shell other than bash here')
  r = subprocess.run([sh, LOCAL_MP, '-n', '2', '--dry-run', '--',
                      'generate'], capture_output=True, text=True,
                     timeout=60, check=False)
  assert r.returncode == 2
  assert r.stderr.startswith('error: this script needs bash >= 4 (this '
                             'shell: not bash)')
  assert r.stdout == ''


@pytest.mark.slow
def test_local_processes_form_one_jax_cluster(tmp_path):
  """Real JAX: the KFORCING_* variables join 2 processes x 4 CPU devices."""
  check = textwrap.dedent("""
      from kforcing_jax import sharding
      assert sharding.maybe_initialize_distributed()
      import jax, jax.numpy as jnp, numpy as np
      from jax.experimental import multihost_utils
      import sys
      ranks = multihost_utils.process_allgather(jnp.array([jax.process_index()]))
      # One write: Gloo logs to the same pipe piece by piece, and a print
      # of several arguments could be split between its pieces.
      sys.stdout.write(
          f'rank {jax.process_index()} of {jax.process_count()} devices '
          f'{jax.local_device_count()} {jax.device_count()} gathered '
          f'{np.asarray(ranks).ravel().tolist()}\\n')
      sys.stdout.flush()
      """)
  # Stands in for the interpreter: runs the check instead of `-m kforcing_jax`.
  wrapper = _write_exe(tmp_path / 'python', f"""
      #!/usr/bin/env bash
      exec {shlex.quote(sys.executable)} -c {shlex.quote(check)}
      """)
  r = local('-n', '2', '-t', '240', '--', 'train-teacher',
            env={'PYTHON': str(wrapper)}, timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr
  for i in (0, 1):
    # Gloo's own log pieces may still land just before the line.
    assert re.search(rf'^\[p{i}\] .*rank {i} of 2 devices 4 8 gathered '
                     r'\[0, 1\]$', r.stdout, re.M), r.stdout


# ------------------------------------------------------ accelerator_check.sh

ACCEL_CHECK = os.path.join(ROOT, 'launch', 'accelerator_check.sh')


@pytest.fixture
def logging_python(tmp_path):
  """Logs argv and the JAX env of each call; fails when argv has FAIL_ON."""
  return _write_exe(tmp_path / 'python', f"""
      #!{sys.executable}
      import json, os, sys
      with open(os.environ['CALL_LOG'], 'a') as f:
        f.write(json.dumps({{'argv': sys.argv[1:], 'env': {{
            n: os.environ.get(n) for n in (
                'JAX_PLATFORMS', 'JAX_DEFAULT_MATMUL_PRECISION',
                'XLA_PYTHON_CLIENT_MEM_FRACTION')}}}}) + '\\n')
      if sys.argv[1] == '-c':  # The backend probe.
        print(os.environ.get('FAKE_BACKEND', 'gpu'))
        sys.exit(0)
      print('ran', ' '.join(sys.argv[1:3]))
      sys.exit(5 if os.environ.get('FAIL_ON', '-') in sys.argv else 0)
      """)


def _accel_check(tmp_path, python, *args, fail_on=None, backend='gpu'):
  """Runs the script; returns its result and the calls other than the
  backend probe."""
  env = dict(os.environ, PYTHON=str(python), FAKE_BACKEND=backend,
             CALL_LOG=str(tmp_path / 'calls.jsonl'))
  env.pop('JAX_PLATFORMS', None)
  if fail_on:
    env['FAIL_ON'] = fail_on
  r = subprocess.run(['bash', ACCEL_CHECK, *args], env=env,
                     capture_output=True, text=True, timeout=60)
  calls = []
  if os.path.exists(env['CALL_LOG']):
    with open(env['CALL_LOG']) as f:
      calls = [json.loads(line) for line in f]
  return r, [c for c in calls if c['argv'][0] != '-c']


def test_accelerator_check_runs_bench_then_tests_on_the_accelerator(
    tmp_path, logging_python):
  out = tmp_path / 'out'
  r, calls = _accel_check(tmp_path, logging_python, str(out),
                          '--config.bench.ks=(4,)')
  assert r.returncode == 0, r.stdout + r.stderr
  bench, tests = calls
  assert bench['argv'][:2] == ['-m', 'kforcing_jax']
  assert 'bench' in bench['argv'] and '--config=configs/lm1b.py' in bench[
      'argv']
  assert f'--workdir={out}/bench_lm1b' in bench['argv']
  assert bench['argv'][-1] == '--config.bench.ks=(4,)'  # Extra flags last.
  assert bench['env']['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.5'
  assert tests['argv'][:2] == ['-m', 'pytest']
  assert tests['argv'][tests['argv'].index('-n') + 1] == '4'
  assert 'tests/test_decode_attention.py' in tests['argv']  # The kernel.
  # Empty JAX_PLATFORMS: the tests' conftest would otherwise pin the CPU.
  assert tests['env']['JAX_PLATFORMS'] == ''
  assert tests['env']['JAX_DEFAULT_MATMUL_PRECISION'] == 'highest'
  assert 'ran -m kforcing_jax' in (out / 'bench.log').read_text()
  assert 'ran -m pytest' in (out / 'tests.log').read_text()


def test_accelerator_check_runs_the_tests_in_one_process_pinned_to_a_tpu(
    tmp_path, logging_python):
  # Three of four workers could not open the TPU and fell back to the CPU.
  r, (_, tests) = _accel_check(tmp_path, logging_python, str(tmp_path / 'o'),
                               backend='tpu')
  assert r.returncode == 0, r.stdout + r.stderr
  assert tests['argv'][tests['argv'].index('-n') + 1] == '1'
  assert tests['env']['JAX_PLATFORMS'] == 'tpu'
  assert "tests on backend 'tpu', 1 worker(s)" in r.stdout


@pytest.mark.parametrize('fail_on', ['bench', 'pytest'])
def test_accelerator_check_fails_if_either_part_fails(tmp_path,
                                                       logging_python,
                                                       fail_on):
  r, calls = _accel_check(tmp_path, logging_python, str(tmp_path / 'o'),
                          fail_on=fail_on)
  assert r.returncode != 0
  assert len(calls) == 2  # The other part still ran.
  assert 'exit 5' in r.stdout


def test_accelerator_check_needs_an_out_dir(tmp_path, logging_python):
  r, calls = _accel_check(tmp_path, logging_python)
  assert r.returncode == 2 and 'usage:' in r.stderr and not calls
