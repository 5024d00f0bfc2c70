"""Training loop: sharding equivalence, resume after SIGKILL, guards, CLI errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from kforcing_jax import checkpoints
from kforcing_jax import defaults
from kforcing_jax import teacher as teacher_lib
from kforcing_jax import train as train_lib
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(mesh_size=1, fsdp=False):
  c = defaults.base_config()
  c.model.vocab_size, c.model.seq_len = 61, 16
  c.model.num_layers, c.model.d_model, c.model.num_heads = 2, 32, 4
  c.model.mlp_dim = 64
  c.train.batch_size, c.train.lr, c.train.warmup_steps = 8, 3e-3, 1
  c.train.eval_every, c.train.checkpoint_every = 0, 100
  c.mesh.data, c.mesh.fsdp = mesh_size, fsdp
  return c


def _data():
  return np.asarray(jax.random.randint(jax.random.PRNGKey(1), (64, 16), 0, 61),
                    np.int32)


@pytest.mark.parametrize('fsdp', [False, True])
def test_sharded_teacher_step_equals_one_device(tmp_path, fsdp):
  params = []
  for size in (1, 8):
    config = _config(size, fsdp=fsdp and size > 1)
    r = train_lib.train(teacher_lib.teacher_task(config), config,
                        str(tmp_path / str(size)),
                        helpers.ArrayIterator(_data(), 8), num_steps=4)
    params.append(r.state.params)
  # Only the cross-device reduction order differs: f32 rounding, far below
  # the ~1e-3 per-step parameter change at lr 3e-3.
  assert helpers.max_abs_diff(params[0], params[1]) < 1e-5


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
  config = _config()
  config.train.checkpoint_every = 5
  task = teacher_lib.teacher_task(config)
  train_lib.train(task, config, str(tmp_path), helpers.ArrayIterator(
      _data(), 8), num_steps=5)
  config.train.lr = 1e30  # Diverges within a step or two.
  with pytest.raises(FloatingPointError, match='non-finite.*step 5'):
    train_lib.train(task, config, str(tmp_path), helpers.ArrayIterator(
        _data(), 8), num_steps=15)
  manager = checkpoints.Manager(str(tmp_path / 'teacher'))
  assert manager.latest_step() == 5
  _, params, _ = checkpoints.load_params(str(tmp_path / 'teacher'))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_corrupt_checkpoint_is_reported(tmp_path):
  config = _config()
  task = teacher_lib.teacher_task(config)
  train_lib.train(task, config, str(tmp_path),
                  helpers.ArrayIterator(_data(), 8), num_steps=2)
  step_dir = tmp_path / 'teacher' / 'checkpoints' / '2'
  shutil.rmtree(step_dir / 'state')
  with pytest.raises(checkpoints.CheckpointError, match='unreadable'):
    checkpoints.load_params(str(tmp_path / 'teacher'))
  assert (step_dir / 'meta').exists()  # Nothing was deleted by the error.


def _cli(args, workdir, **kw):
  return subprocess.run(
      [sys.executable, '-m', 'kforcing_jax', *args, f'--workdir={workdir}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.parametrize('override,needle', [
    ('--config.train.no_such_field=1', 'unknown config field(s): train.no_such_field'),
    ('--config.train.lr=fast', "could not convert string to float: 'fast'"),
    ('--config.model.seq_len=1', 'model.seq_len=1'),
    ('--config.model.num_heads=3', 'model.num_heads=3 must divide'),
    ('--config.data.source=web', "data.source='web'"),
    ('--config.distill.windows=(1,3)', 'distill.windows=(1, 3)'),
])
def test_cli_bad_config_fails_fast_with_named_value(tmp_path, override, needle):
  r = _cli(['train-teacher', '--config=configs/tiny.py', override], tmp_path)
  assert r.returncode == 2, r.stderr
  assert needle in r.stderr
  assert not (tmp_path / 'teacher').exists()


def _train_cmd(workdir, steps):
  return [sys.executable, '-m', 'kforcing_jax', 'train-teacher',
          '--config=configs/tiny.py', f'--workdir={workdir}',
          f'--config.train.num_steps={steps}',
          '--config.train.checkpoint_every=10', '--config.train.log_every=1',
          '--config.train.eval_every=0']


def _losses(workdir):
  with open(os.path.join(workdir, 'teacher', 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(tmp_path):
  steps = 120
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  subprocess.run(_train_cmd(straight, steps), cwd=ROOT, check=True,
                 capture_output=True, timeout=600)
  proc = subprocess.Popen(_train_cmd(killed, steps), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = killed / 'teacher' / 'checkpoints'
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if ckpt.exists() and any(d.name.isdigit() for d in ckpt.iterdir()):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  first = checkpoints.Manager(str(killed / 'teacher')).latest_step()
  assert first is not None and first < steps, 'killed too late to test resume'
  subprocess.run(_train_cmd(killed, steps), cwd=ROOT, check=True,
                 capture_output=True, timeout=600)
  _, a, _ = checkpoints.load_params(str(straight / 'teacher'))
  _, b, _ = checkpoints.load_params(str(killed / 'teacher'))
  # Same program, same data order, same rng: bitwise equal on CPU.
  assert helpers.max_abs_diff(a, b) == 0.0
  la, lb = _losses(straight), _losses(killed)
  assert la.keys() == lb.keys() and all(la[s] == lb[s] for s in la)


@pytest.mark.slow
def test_sigterm_saves_and_exits_then_resumes(tmp_path):
  proc = subprocess.Popen(_train_cmd(tmp_path, 100000), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  metrics = tmp_path / 'teacher' / 'metrics.jsonl'
  deadline = time.time() + 300
  while time.time() < deadline and not (
      metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert 'SIGTERM: saved step' in out
  saved = checkpoints.Manager(str(tmp_path / 'teacher')).latest_step()
  assert saved is not None and saved >= 3
  logged = max(_losses(tmp_path))
  assert saved >= logged  # The step boundary it stopped at was saved.
