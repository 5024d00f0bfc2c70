"""AOT compile of the paper-scale steps from abstract inputs only.

configs/lm1b.py at its real width, vocabulary, length and batch (512 x 128,
64 sequences per device), with num_layers cut to 2 so that the compiles fit
in about a minute on two CPU cores; the depth does not change what is
checked (FSDP vs replicated state bytes, positive memory analysis).
"""

import importlib.util
import json
import os
import subprocess
import sys

from absl import app
import jax
import pytest

from kforcing_jax import aot
from kforcing_jax import sharding

from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8


def _lm1b(num_layers=2):
  spec = importlib.util.spec_from_file_location(
      'lm1b_config', os.path.join(ROOT, 'configs', 'lm1b.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.num_layers = num_layers
  return config


@pytest.fixture(scope='module')
def teacher_rows():
  mesh = aot.cpu_mesh(DEVICES)
  config = _lm1b()
  return {fsdp: aot.compile_step(config, aot.TEACHER, mesh, fsdp=fsdp,
                                 batch_size=config.train.batch_size)
          for fsdp in (True, False)}


def _check_positive(row):
  for field in ('argument_size_in_bytes', 'output_size_in_bytes',
                'temp_size_in_bytes', 'peak_estimate_bytes'):
    assert row[field] > 0, (field, row)
  # The XLA CPU backend reports 0 generated-code bytes; TPU reports > 0.
  assert row['generated_code_size_in_bytes'] >= 0


@pytest.mark.slow
def test_teacher_fsdp_divides_state_bytes_by_device_count(teacher_rows):
  fsdp, rep = teacher_rows[True], teacher_rows[False]
  for row in (fsdp, rep):
    _check_positive(row)
    assert row['per_device_batch'] == 512 // DEVICES
  # Arguments are the state (params, Adam moments, EMA) and the batch.
  assert rep['argument_size_in_bytes'] >= rep['state_bytes_global']
  ratio = rep['argument_size_in_bytes'] / fsdp['argument_size_in_bytes']
  # Scalars, the rng and the batch stay replicated/small: close to 8.
  assert 0.9 * DEVICES < ratio <= DEVICES, ratio
  # Donation: the new state reuses the old state's buffers.
  assert fsdp['alias_size_in_bytes'] >= 0.99 * fsdp['output_size_in_bytes']


@pytest.mark.slow
def test_teacher_fsdp_keeps_activations_batch_sharded(teacher_rows):
  # Same per-device activations as replicated params, not ~5x more.
  fsdp, rep = teacher_rows[True], teacher_rows[False]
  assert fsdp['temp_size_in_bytes'] < 1.2 * rep['temp_size_in_bytes']


@pytest.mark.slow
def test_distill_step_compiles_as_training_runs_it():
  # Replicated state, as train() runs the shard_map step (it refuses
  # mesh.fsdp there); an FSDP row would understate the memory.
  config = _lm1b()
  mesh = aot.cpu_mesh(DEVICES)
  with pytest.raises(ValueError, match='replicated state'):
    aot.compile_step(config, aot.DISTILL, mesh, fsdp=True,
                     batch_size=config.distill.batch_size)
  row = aot.compile_step(config, aot.DISTILL, mesh, fsdp=False,
                         batch_size=config.distill.batch_size)
  _check_positive(row)
  assert row['num_windows'] == config.distill.num_windows
  # The frozen k=2 student and the k=4 student's state, both whole.
  expected = row['frozen_bytes_global'] + row['state_bytes_global']
  assert abs(row['argument_size_in_bytes'] - expected) < 0.05 * expected


def test_distill_step_is_compiled_with_the_configs_readout():
  # A sampled rollout projects through full logits, not the argmax's
  # kernels: the step compiled must be the one distill runs.
  config = _lm1b()
  config.distill.readout = 'sample'
  config.distill.readout_temperature = 0.8
  stage = aot._distill_stage(config)  # pylint: disable=protected-access
  assert (stage.readout, stage.readout_temperature) == ('sample', 0.8)
  assert aot._distill_stage(_lm1b()).readout == 'argmax'  # pylint: disable=protected-access


def test_mesh_needs_enough_devices():
  with pytest.raises(ValueError, match='xla_force_host_platform_device_count'):
    aot.cpu_mesh(jax.device_count('cpu') + 1)


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason='libtpu not installed (pip install libtpu)')
@pytest.mark.slow
def test_compiles_for_a_tpu_slice_without_a_tpu(tmp_path):
  # A fresh process: the TPU plugin must load before JAX's backends start.
  out = tmp_path / 'tpu.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'kforcing_jax.aot',
       f'--config={ROOT}/configs/lm1b.py', '--config.model.num_layers=2',
       '--tpu_topology=v5e:2x4', '--steps=teacher', f'--out={out}'],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json  # pylint: disable=g-import-not-at-top
  row = json.loads(out.read_text())['rows'][0]
  assert row['platform'] == 'tpu' and row['devices'] == 8
  _check_positive(row)
  assert row['generated_code_size_in_bytes'] > 0


def test_gather_for_compute_all_gathers_sharded_params():
  mesh = aot.cpu_mesh(DEVICES)
  x = jax.ShapeDtypeStruct((DEVICES * 16, 4), jax.numpy.float32,
                           sharding=sharding.batch_sharding(mesh))
  hlo = jax.jit(lambda a: sharding.gather_for_compute(a, mesh) * 2).lower(
      x).compile().as_text()
  assert 'all-gather' in hlo


def test_the_teacher_row_follows_mesh_fsdp(monkeypatch):
  # It was always the FSDP step: for a replicated config (tiny, demo) that
  # under-reported the memory training needs.
  monkeypatch.setattr(aot, 'compile_step',
                      lambda config, which, mesh, *, fsdp, batch_size: dict(
                          step=which, fsdp=fsdp))
  monkeypatch.setattr(aot, 'format_table', lambda rows, header: '')
  config = _lm1b()
  mesh = aot.cpu_mesh(DEVICES)
  fsdp_of = lambda **kw: [r['fsdp'] for r in aot.run(
      config, mesh, steps=(aot.TEACHER,), **kw)]
  assert config.mesh.fsdp and fsdp_of() == [True]
  assert fsdp_of(replicated=True) == [True, False]
  config.mesh.fsdp = False
  assert fsdp_of() == [False] and fsdp_of(replicated=True) == [False]


def test_a_step_that_does_not_compile_is_a_row_not_a_crash(monkeypatch,
                                                            capsys):
  def compile_step(config, which, mesh, *, fsdp, batch_size):
    if which == aot.DISTILL:
      raise RuntimeError('RESOURCE_EXHAUSTED: 27.69G exceeds 15.75G\ntrace')
    return dict(config=config.name, step=which, fsdp=fsdp, devices=8,
                global_batch=batch_size, per_device_batch=1,
                argument_size_in_bytes=1, output_size_in_bytes=1,
                alias_size_in_bytes=0, temp_size_in_bytes=1,
                generated_code_size_in_bytes=0, compile_s=0.1)

  monkeypatch.setattr(aot, 'compile_step', compile_step)
  rows = aot.run(_lm1b(), aot.cpu_mesh(DEVICES),
                 steps=(aot.DISTILL, aot.TEACHER))
  assert rows[0]['error'] == 'RuntimeError: RESOURCE_EXHAUSTED: 27.69G ' \
      'exceeds 15.75G'
  assert 'argument_size_in_bytes' in rows[1]  # The next step still ran.
  out = capsys.readouterr().out
  assert 'did not compile: RuntimeError: RESOURCE_EXHAUSTED' in out
  assert out.count('config | step') == 1  # One header, over the first row.


@pytest.mark.parametrize('args,message', [
    (['--devices=x'], "--devices='x': expected a positive integer"),
    (['--devices=0'], "--devices='0': expected a positive integer"),
    (['--config.train.lrr=1'], 'unknown config field(s): train.lrr'),
    (['--config=configs/nope.py'], '--config=configs/nope.py: no such file'),
    (['--bogus=1'], "Unknown command line flag 'bogus'"),
    (['--steps=teacher', '--batch_size=3', '--devices=2'],
     'global batch 3 (--batch_size, or train.batch_size when 0) is not '
     'divisible by the 2 devices'),
    # Checked before the teacher compiles, not after.
    (['--distill_batch_size=5', '--devices=2'],
     'global batch 5 (--distill_batch_size, or distill.batch_size when 0) is '
     'not divisible by the 2 devices'),
    (['--batch_size=-8'], "--batch_size=-8 must be >= 0 (0: the config's)"),
    (['--out=/nonexistent/dir/aot.json'],
     '--out=/nonexistent/dir/aot.json: folder /nonexistent/dir does not '
     'exist'),
    (['--out=README.md/aot.json'],
     f'--out=README.md/aot.json: {ROOT}/README.md is a file, not a folder'),
    (['--config.train.grad_clip=-1'], 'train.grad_clip=-1.0 must be finite and >= 0'),
    # Refused before compiling: both used to fail only after the compiles.
    (['--out=configs'], '--out=configs is a directory; name a file, e.g. '
     'configs/aot.json'),
    (['--steps='], '--steps is empty; expected teacher, distill or both'),
])
def test_bad_command_lines_are_one_line(args, message):
  if not any(a.startswith('--config=') for a in args):
    args = ['--config=configs/tiny.py', *args]
  proc = subprocess.run([sys.executable, '-m', 'kforcing_jax.aot', *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [f'error: {message}']


def test_out_on_a_read_only_folder_is_refused_before_compiling(
    monkeypatch, tmp_path):
  # As root on a read-only mount os.access says writable; the result
  # (written by a rename in that folder) would be lost after the compiles.
  helpers.read_only(monkeypatch, tmp_path)
  out = str(tmp_path / 'aot.json')
  with pytest.raises(app.UsageError,
                     match=f'--out={out}: {tmp_path} is not writable'):
    aot._check_out(out)  # pylint: disable=protected-access
  (tmp_path / 'writable').mkdir()
  aot._check_out(str(tmp_path / 'writable' / 'aot.json'))  # pylint: disable=protected-access


def test_a_step_named_twice_compiles_once():
  assert aot._steps_from_flag(['teacher', 'distill', 'teacher']) == (  # pylint: disable=protected-access
      aot.TEACHER, aot.DISTILL)


def test_devices_is_ignored_with_a_tpu_topology():
  # --help says so, but --devices=0 was refused before the topology ran.
  proc = subprocess.run(
      [sys.executable, '-m', 'kforcing_jax.aot', '--config=configs/tiny.py',
       '--tpu_topology=v5e:2x2', '--devices=0'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert '--devices' not in proc.stderr
  if importlib.util.find_spec('libtpu') is None:  # As on CI.
    assert "TPU topology 'v5e:2x2' unavailable" in proc.stdout + proc.stderr


def test_jax_platforms_without_cpu_is_refused_in_one_line():
  # aot compiles for CPU devices; JAX_PLATFORMS=cuda on a machine without
  # the CUDA plugin ended in jax's bare AssertionError traceback.
  proc = subprocess.run(
      [sys.executable, '-m', 'kforcing_jax.aot', '--config=configs/tiny.py'],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS='cuda'))
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: JAX_PLATFORMS='cuda' leaves out cpu, and without "
      '--tpu_topology aot compiles for CPU devices: unset JAX_PLATFORMS or '
      'add cpu to it']


def test_devices_flag_replaces_an_inherited_device_count(tmp_path):
  """--devices wins over XLA_FLAGS (the mesh error says this module sets
  the count); an inherited count of 2 used to make --devices=4 fail."""
  out = tmp_path / 'aot.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'kforcing_jax.aot', '--config=configs/tiny.py',
       '--devices=4', '--steps=teacher', f'--out={out}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ,
               XLA_FLAGS='--xla_force_host_platform_device_count=2'))
  assert proc.returncode == 0, proc.stderr
  rows = json.loads(out.read_text())['rows']
  assert [r['devices'] for r in rows] == [4]


def test_main_cli_points_at_the_aot_module():
  proc = subprocess.run([sys.executable, '-m', 'kforcing_jax', 'aot',
                         '--workdir=w'], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2
  assert 'python -m kforcing_jax.aot --help' in proc.stderr
  helped = subprocess.run([sys.executable, '-m', 'kforcing_jax', '--help'],
                          cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
  assert 'python -m kforcing_jax.aot --help' in helped.stdout
