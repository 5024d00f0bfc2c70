"""Multi-process training: 2 local processes x 4 CPU devices == 1 x 8.

The slow test starts tests/multihost_worker.py twice with the KFORCING_*
variables (one coordinator, a shared workdir as on a TPU pod), trains the
tiny teacher (FSDP: its state spans both processes) and a k=1 distillation
stage, and compares every parameter with one process of 8 devices doing
the same. The fast tests cover the environment parsing.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from kforcing_jax import sharding
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, 'tests', 'multihost_worker.py')
# Every process, whatever happens, is killed after this.
DEADLINE_S = 420

OVERRIDES = {
    'train.num_steps': 4, 'train.warmup_steps': 1, 'train.eval_every': 2,
    'train.checkpoint_every': 2, 'distill.windows': [1],
    'distill.steps_per_stage': 3, 'distill.warmup_steps': 1,
    'distill.eval_every': 3, 'distill.checkpoint_every': 2,
}
TEACHER_OVERRIDES = {'mesh.fsdp': True}
# Teacher: only the cross-device/cross-process reduction order differs (f32
# rounding). Students: Adam normalises each update, so f32 noise in a
# near-zero gradient can move a weight by a fraction of lr (1e-3) per step;
# a real bug (wrong rows, unaveraged gradients) shows at >= lr.
TEACHER_ATOL = 1e-5
STUDENT_ATOL = 2e-4

_DIST_VARS = (sharding.ENV_COORDINATOR, sharding.ENV_NUM_PROCESSES,
              sharding.ENV_PROCESS_ID, sharding.ENV_DISTRIBUTED,
              'TPU_WORKER_HOSTNAMES')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
  env.update(XLA_FLAGS=helpers.xla_flags(devices),
             JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _kill(procs):
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGKILL)  # The worker's own process group.
      except ProcessLookupError:
        pass
  for p in procs:
    p.wait()


def _run_workers(envs, workdir, out, logs, deadline):
  """Runs one worker per env; all killed at the first failure or deadline."""
  args = [sys.executable, WORKER, str(workdir), str(out),
          json.dumps(OVERRIDES), json.dumps(TEACHER_OVERRIDES)]
  procs, files = [], []
  try:
    for env, log in zip(envs, logs):
      f = open(log, 'w')
      files.append(f)
      procs.append(subprocess.Popen(args, env=env, cwd=ROOT, stdout=f,
                                    stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL,
                                    start_new_session=True))
    while any(p.poll() is None for p in procs):
      # A dead peer leaves the others blocked in a collective: stop them.
      if any(p.poll() not in (None, 0) for p in procs):
        break
      if time.monotonic() > deadline:
        break
      time.sleep(0.5)
  finally:
    _kill(procs)
    for f in files:
      f.close()
  codes = [p.returncode for p in procs]
  if codes != [0] * len(procs):
    tails = '\n'.join(f'--- {log} (exit {c}) ---\n' + open(log).read()[-3000:]
                      for log, c in zip(logs, codes))
    pytest.fail(f'workers failed or timed out: exit codes {codes}\n{tails}')


def _metrics(run_dir):
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f if l.strip()]


def _assert_same_params(got_npz, want_npz):
  """Every run's parameters in two workers' outputs agree (tolerances
  above), a distilled student among them."""
  got, want = np.load(got_npz), np.load(want_npz)
  assert sorted(got) == sorted(want)
  assert any(k.startswith('student_k1') for k in want)
  for key in want:
    atol = TEACHER_ATOL if key.startswith('teacher') else STUDENT_ATOL
    np.testing.assert_allclose(got[key], want[key], rtol=0, atol=atol,
                               err_msg=key)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  deadline = time.monotonic() + DEADLINE_S
  port = _free_port()
  multi, single = tmp_path / 'multi', tmp_path / 'single'
  _run_workers(
      [_env(4, KFORCING_COORDINATOR=f'localhost:{port}',
            KFORCING_NUM_PROCESSES=2, KFORCING_PROCESS_ID=i)
       for i in range(2)],
      multi, tmp_path / 'multi.npz',
      [tmp_path / 'multi0.log', tmp_path / 'multi1.log'], deadline)
  log1 = open(tmp_path / 'multi1.log').read()
  assert 'process 1/2 done, 8 devices' in log1
  _run_workers([_env(8)], single, tmp_path / 'single.npz',
               [tmp_path / 'single.log'], deadline)

  _assert_same_params(tmp_path / 'multi.npz', tmp_path / 'single.npz')

  for run in ('teacher', 'student_k1'):
    # One process wrote the metrics (no duplicated lines); same values.
    m, s = _metrics(multi / run), _metrics(single / run)
    assert [r['step'] for r in m] == [r['step'] for r in s]
    for a, b in zip(m, s):
      for k in b:
        if k != 'tokens_per_s':
          np.testing.assert_allclose(a[k], b[k], rtol=1e-4, err_msg=k)
    # Checkpoints were written collectively, to the shared workdir.
    steps = os.listdir(multi / run / 'checkpoints')
    assert str(OVERRIDES['train.num_steps'] if run == 'teacher' else
               OVERRIDES['distill.steps_per_stage']) in steps


@pytest.mark.slow
def test_a_teacher_trained_in_one_process_distils_in_two(tmp_path):
  # load_params restored a multi-process run's checkpoints only in their
  # saved layout: distilling on two processes from a teacher trained in one
  # failed ("Topology mismatch"), and the error's advice did not help.
  deadline = time.monotonic() + DEADLINE_S
  workdir = tmp_path / 'w'
  _run_workers([_env(2)], workdir, tmp_path / 'single.npz',
               [tmp_path / 'single.log'], deadline)
  shutil.rmtree(workdir / 'student_k1')
  port = _free_port()
  _run_workers(
      [_env(2, KFORCING_COORDINATOR=f'localhost:{port}',
            KFORCING_NUM_PROCESSES=2, KFORCING_PROCESS_ID=i)
       for i in range(2)],
      workdir, tmp_path / 'multi.npz',
      [tmp_path / 'multi0.log', tmp_path / 'multi1.log'], deadline)
  _assert_same_params(tmp_path / 'multi.npz', tmp_path / 'single.npz')


@pytest.mark.slow
def test_a_signal_to_one_process_stops_all_at_the_same_step(tmp_path):
  # SIGTERM reaches only process 1. The processes agree every
  # train.log_every steps, so both save the same step and exit 0; deciding
  # alone, process 1 would save while process 0 waits in the next step's
  # collective, and both would hang.
  port = _free_port()
  overrides = dict(OVERRIDES, **{'train.num_steps': 100000,
                                 'train.log_every': 2,
                                 'train.eval_every': 0})
  args = [sys.executable, WORKER, str(tmp_path / 'w'),
          str(tmp_path / 'out.npz'), json.dumps(overrides)]
  procs, logs = [], [tmp_path / f'p{i}.log' for i in range(2)]
  try:
    for i in range(2):
      env = _env(4, KFORCING_COORDINATOR=f'localhost:{port}',
                 KFORCING_NUM_PROCESSES=2, KFORCING_PROCESS_ID=i)
      procs.append(subprocess.Popen(args, env=env, cwd=ROOT,
                                    stdout=open(logs[i], 'w'),
                                    stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL,
                                    start_new_session=True))
    metrics = tmp_path / 'w' / 'teacher' / 'metrics.jsonl'
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline and all(
        p.poll() is None for p in procs) and not (
            metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
      time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    for p in procs:
      p.wait(timeout=max(1, deadline - time.monotonic()))
  finally:
    _kill(procs)
  outs = [open(log).read() for log in logs]
  assert [p.returncode for p in procs] == [0, 0], outs
  steps = {int(o.split('stopped at step ')[1].split()[0]) for o in outs}
  assert len(steps) == 1, outs
  step = steps.pop()
  assert step % 2 == 0 and step >= 6
  from kforcing_jax import checkpoints  # pylint: disable=g-import-not-at-top
  assert checkpoints.Manager(str(tmp_path / 'w' / 'teacher')).latest_step() \
      == step


@pytest.fixture
def dist_env(monkeypatch):
  for name in _DIST_VARS:
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def test_no_variables_means_single_process(dist_env):
  assert sharding.distributed_settings() is None
  assert not sharding.maybe_initialize_distributed()


def test_print_once_prints_on_process_0_and_outside_a_distributed_run(
    monkeypatch, capsys):
  def no_backend(*a, **k):
    raise AssertionError('asked for the process index outside a '
                         'distributed run (that starts the JAX backend)')
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  monkeypatch.setattr(jax, 'process_index', no_backend)
  sharding.print_once('single')
  assert sharding.is_main_process()
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: True)
  for index in (0, 1, 3):
    monkeypatch.setattr(jax, 'process_index', lambda *a, i=index, **k: i)
    sharding.print_once(f'process {index}')
  assert capsys.readouterr().out == 'single\nprocess 0\n'


def test_explicit_variables(dist_env):
  dist_env.setenv(sharding.ENV_COORDINATOR, '10.0.0.1:8476')
  dist_env.setenv(sharding.ENV_NUM_PROCESSES, '4')
  dist_env.setenv(sharding.ENV_PROCESS_ID, '3')
  assert sharding.distributed_settings() == dict(
      coordinator_address='10.0.0.1:8476', num_processes=4, process_id=3)
  dist_env.setenv(sharding.ENV_DISTRIBUTED, 'off')
  assert sharding.distributed_settings() is None


def test_auto_and_tpu_pod_detection(dist_env):
  dist_env.setenv('TPU_WORKER_HOSTNAMES', 'w0')  # One host: nothing to do.
  assert sharding.distributed_settings() is None
  dist_env.setenv('TPU_WORKER_HOSTNAMES', 'w0,w1')
  assert sharding.distributed_settings() == {}
  dist_env.delenv('TPU_WORKER_HOSTNAMES')
  dist_env.setenv(sharding.ENV_DISTRIBUTED, 'auto')
  assert sharding.distributed_settings() == {}


@pytest.mark.parametrize('values, needle', [
    ({sharding.ENV_COORDINATOR: 'h:1'}, sharding.ENV_NUM_PROCESSES),
    ({sharding.ENV_COORDINATOR: 'nohost', sharding.ENV_NUM_PROCESSES: '2',
      sharding.ENV_PROCESS_ID: '0'}, "KFORCING_COORDINATOR='nohost'"),
    ({sharding.ENV_COORDINATOR: 'h:1', sharding.ENV_NUM_PROCESSES: 'two',
      sharding.ENV_PROCESS_ID: '0'}, "KFORCING_NUM_PROCESSES='two'"),
    ({sharding.ENV_COORDINATOR: 'h:1', sharding.ENV_NUM_PROCESSES: '2',
      sharding.ENV_PROCESS_ID: '2'}, "KFORCING_PROCESS_ID='2'"),
    ({sharding.ENV_DISTRIBUTED: 'yes'}, "KFORCING_DISTRIBUTED='yes'"),
])
def test_bad_variables_are_named(dist_env, values, needle):
  for name, value in values.items():
    dist_env.setenv(name, value)
  with pytest.raises(ValueError, match=needle):
    sharding.maybe_initialize_distributed()


def test_too_late_is_a_clear_error(dist_env):
  jax.devices()  # Backends are up: joining a cluster is no longer possible.
  dist_env.setenv(sharding.ENV_COORDINATOR, f'localhost:{_free_port()}')
  dist_env.setenv(sharding.ENV_NUM_PROCESSES, '2')
  dist_env.setenv(sharding.ENV_PROCESS_ID, '0')
  with pytest.raises(RuntimeError, match='call it first'):
    sharding.maybe_initialize_distributed()


def test_a_partial_data_axis_is_refused_in_a_multi_process_run(monkeypatch):
  # jax.devices()[:size] would be the first processes' devices only, while
  # every process feeds its share of each batch: process 0 built half a
  # global batch, process 1 died of a bare StopIteration.
  assert jax.device_count() == 8  # conftest.py's fake CPU devices.
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  with pytest.raises(ValueError, match=r'mesh.data=4: a multi-process run '
                     r'\(2 processes\) uses every device, 8; set mesh.data=-1'):
    sharding.data_axis_size(ml_collections.ConfigDict({'data': 4}))
  assert sharding.data_axis_size(ml_collections.ConfigDict({'data': -1})) == 8
  assert sharding.data_axis_size(ml_collections.ConfigDict({'data': 8})) == 8
  monkeypatch.setattr(jax, 'process_count', lambda: 1)  # One process: fine.
  assert sharding.data_axis_size(ml_collections.ConfigDict({'data': 4})) == 4


_SHARED_CHECK = '''
import sys
from kforcing_jax import sharding
assert sharding.maybe_initialize_distributed()
try:
  sharding.check_shared_workdir(sys.argv[1], wait_s=1.0)
except ValueError as e:
  print('refused:', e)
  sys.exit(3)
print('shared')
'''


def _check_shared(dirs):
  """Runs check_shared_workdir in two processes, each given its dir."""
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, '-c', _SHARED_CHECK, str(d)], cwd=ROOT, text=True,
      env=_env(1, KFORCING_COORDINATOR=f'localhost:{port}',
               KFORCING_NUM_PROCESSES=2, KFORCING_PROCESS_ID=i),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      stdin=subprocess.DEVNULL, start_new_session=True)
           for i, d in enumerate(dirs)]
  try:
    outs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    _kill(procs)
  return [p.returncode for p in procs], outs


@pytest.mark.slow
def test_a_process_that_fails_alone_exits_at_once(tmp_path):
  # E.g. a tokenizer on one host's disk only. The failing process used to
  # wait 5 minutes at JAX's shutdown barrier for the others, which wait in
  # a collective for it; a launcher saw nothing until both aborted.
  port = _free_port()
  command = [sys.executable, '-m', 'kforcing_jax', 'train-teacher',
             '--config=configs/tiny.py', f'--workdir={tmp_path / "w"}']
  bad = f'--config.data.tokenizer_path={tmp_path / "missing.model"}'
  procs = [subprocess.Popen(
      command + ([bad] if i else []), cwd=ROOT, text=True,
      env=_env(1, KFORCING_COORDINATOR=f'localhost:{port}',
               KFORCING_NUM_PROCESSES=2, KFORCING_PROCESS_ID=i),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      stdin=subprocess.DEVNULL, start_new_session=True) for i in range(2)]
  try:
    out = procs[1].communicate(timeout=60)[0]  # 4 s on 2 cores.
  finally:
    _kill(procs)
  assert procs[1].returncode == 2, out
  assert 'error: Tokenizer file not found' in out, out
  assert 'this process stops here' in out, out


@pytest.mark.slow
def test_a_workdir_the_processes_do_not_share_is_refused(tmp_path):
  # One directory for both: passes, and the marker is gone afterwards.
  codes, outs = _check_shared([tmp_path / 'w', tmp_path / 'w'])
  assert codes == [0, 0], outs
  assert os.listdir(tmp_path / 'w') == []
  # A folder per process, as a local path on each host of a pod would be:
  # every process stops with the same error (none waits in a collective).
  codes, outs = _check_shared([tmp_path / 'a', tmp_path / 'b'])
  assert codes == [3, 3], outs
  for out in outs:
    assert 'is not shared: process(es) [1] of 2 cannot see a file' in out
  assert os.listdir(tmp_path / 'a') == []
