"""K-Forcing core invariants: layouts, targets, masks, sharding, errors."""

import dataclasses
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kforcing_jax import checkpoints
from kforcing_jax import decode
from kforcing_jax import defaults
from kforcing_jax import distill
from kforcing_jax import model as model_lib
from kforcing_jax import train as train_lib
from tests import helpers

ATOL = 1e-5  # f32; train and decode layouts reduce in different orders.
# Jitted: run op by op, every new shape compiled each op of the model on its
# own, seconds per call on 2 cores.
_forward = jax.jit(decode.forward, static_argnums=0)
_pf_slot_logits = jax.jit(distill.pf_slot_logits, static_argnums=0)


def _student(small_cfg, window, seed=0):
  cfg = dataclasses.replace(small_cfg, noise_window=window)
  return cfg, model_lib.init_params(cfg, jax.random.PRNGKey(seed))


def _decode_logits(cfg, params, prompt_BxP, first_u_BxK, tokens_BxT=None,
                   second_u_BxK=None):
  """Logits of the prefill step and, optionally, of one more PF step."""
  k = first_u_BxK.shape[1]
  spec = decode.DecodeSpec(model=cfg, k=k, num_steps=2,
                           prompt_len=prompt_BxP.shape[1])
  b = prompt_BxP.shape[0]
  pad = jnp.zeros((b,), jnp.int32)
  logits1, cache = _forward(spec, params, prompt_BxP, first_u_BxK,
                            decode.init_cache(spec, b), 0, pad)
  if tokens_BxT is None:
    return logits1
  logits2, _ = _forward(spec, params, tokens_BxT, second_u_BxK, cache,
                        prompt_BxP.shape[1], pad)
  return logits1, logits2


def test_train_layout_equals_cached_decoding(small_cfg):
  """Slot logits of the training layout == those of the decoding layout."""
  k = 3
  cfg, params = _student(small_cfg, k)
  b, n = 2, 14
  tokens = jax.random.randint(jax.random.PRNGKey(1), (b, n), 0, 61)
  windows = jnp.broadcast_to(jnp.arange(n - k), (b, n - k))
  u = jax.random.uniform(jax.random.PRNGKey(2), windows.shape + (k,))
  train_logits = _pf_slot_logits(cfg, params, tokens, windows, u)
  for t in (0, 4, n - k - 1):
    got = _decode_logits(cfg, params, tokens[:, :t + 1], u[:, t])
    np.testing.assert_allclose(got, train_logits[:, t], atol=ATOL)


def test_second_step_equals_training_layout_with_fed_tokens(small_cfg):
  """A PF step [k tokens | k noise] == training layout with slot tokens."""
  k = 2
  cfg, params = _student(small_cfg, k)
  b, n, t = 2, 10, 5
  tokens = jax.random.randint(jax.random.PRNGKey(1), (b, n), 0, 61)
  fed = jax.random.randint(jax.random.PRNGKey(3), (b, k), 0, 61)
  u1, u2 = jax.random.uniform(jax.random.PRNGKey(4), (2, b, k))
  _, step2 = _decode_logits(cfg, params, tokens[:, :t + 1], u1, fed, u2)
  windows = jnp.full((b, 1), t)
  train2 = _pf_slot_logits(cfg, params, tokens, windows, u2[:, None],
                          slot_tokens_BxMxT=fed[:, None])
  np.testing.assert_allclose(step2, train2[:, 0], atol=ATOL)


def test_slots_see_only_earlier_noise_of_their_own_window(small_cfg):
  k = 3
  cfg, params = _student(small_cfg, k)
  b, n = 1, 8
  tokens = jax.random.randint(jax.random.PRNGKey(1), (b, n), 0, 61)
  windows = jnp.array([[1, 4, 6]])
  u = jax.random.uniform(jax.random.PRNGKey(2), (b, 3, k))
  probe = jax.random.normal(jax.random.PRNGKey(5), (61,))

  def readout(u):
    logits = _pf_slot_logits(cfg, params, tokens, windows, u)
    return logits @ probe  # (B, M, K)

  jac = np.abs(np.asarray(jax.jacobian(readout)(u)))[0, :, :, 0]  # MxKxMxK
  for m in range(3):
    for i in range(k):
      for m2 in range(3):
        for j in range(k):
          allowed = m2 == m and j <= i
          if allowed:
            assert jac[m, i, m2, j] > 0, (m, i, m2, j)
          else:
            assert jac[m, i, m2, j] == 0, (m, i, m2, j)


def test_slots_ignore_context_after_their_window(small_cfg):
  k = 2
  cfg, params = _student(small_cfg, k)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 12), 0, 61)
  windows = jnp.array([[3, 7]])
  u = jax.random.uniform(jax.random.PRNGKey(2), (1, 2, k))
  a = _pf_slot_logits(cfg, params, tokens, windows, u)
  changed = tokens.at[:, 4:].set((tokens[:, 4:] + 7) % 61)
  b = _pf_slot_logits(cfg, params, changed, windows, u)
  np.testing.assert_allclose(a[:, 0], b[:, 0], atol=ATOL)  # t=3: unchanged.
  assert float(jnp.abs(a[:, 1] - b[:, 1]).max()) > 1e-3  # t=7 sees it.


_self_forcing_targets = jax.jit(distill.self_forcing_targets,
                                static_argnums=(0, 5, 6, 7))


@pytest.mark.parametrize('readout,temperature', [('argmax', 1.0),
                                                 ('sample', 0.7),
                                                 ('median', 0.7)])
def test_double_forward_equals_two_decoding_steps(small_cfg, readout,
                                                  temperature):
  # distill.readout: the previous student's tokens are the ones its decoder
  # emits with that readout, sampled ones included (at its temperature).
  m = 2
  cfg, params = _student(small_cfg, m, seed=3)
  b, n = 2, 16
  tokens = jax.random.randint(jax.random.PRNGKey(1), (b, n), 0, 61)
  windows = jnp.array([[2, 6, 11], [0, 9, 5]])
  u = jax.random.uniform(jax.random.PRNGKey(6), (b, 3, 2 * m))
  targets = np.asarray(_self_forcing_targets(
      cfg, params, tokens, windows, u, 'reference', readout, 'auto',
      temperature))
  for r in range(b):
    for w in range(3):
      t = int(windows[r, w])
      # One prompt width: one compiled decode for every window.
      out = decode.generate(params, cfg, [np.asarray(tokens[r, :t + 1])],
                            max_new_tokens=2 * m, k=m, prompt_width=n,
                            noise=np.asarray(u[r:r + 1, w]), readout=readout,
                            temperature=temperature)
      np.testing.assert_array_equal(out.tokens[0], targets[r, w])
  if readout != 'argmax':  # Else this checked argmax twice,
    for other in (('argmax', 'auto', 1.0), (readout, 'auto', 1.0),
                  ({'sample': 'median', 'median': 'sample'}[readout],
                   'auto', temperature)):
      again = _self_forcing_targets(cfg, params, tokens, windows, u,
                                    'reference', *other)
      assert (np.asarray(again) != targets).any()  # or ignored it.


def test_a_stage_rolls_its_source_out_with_the_configured_readout(small_cfg):
  cfg, params = _student(small_cfg, 1, seed=3)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 61)
  stage = distill.Stage(window=2, method='self_forcing',
                        student_cfg=distill.student_config(small_cfg, 2),
                        source_cfg=cfg, num_windows=4, readout='sample',
                        readout_temperature=0.7)
  extras = stage.extras(jax.random.PRNGKey(5), tokens, params)
  expected = _self_forcing_targets(cfg, params, tokens, extras['windows'],
                                   extras['u'], stage.kernel_impl, 'sample',
                                   'auto', 0.7)
  np.testing.assert_array_equal(extras['targets'], expected)
  with pytest.raises(ValueError, match="readout='mode': expected one of"):
    distill.self_forcing_targets(cfg, params, tokens, extras['windows'],
                                 extras['u'], readout='mode')


def test_ar_targets_are_inverse_cdf_samples_of_the_teacher(small_cfg):
  params = model_lib.init_params(small_cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 0, 61)
  windows = jnp.array([[0, 4, 8], [3, 3, 1]])
  u = jax.random.uniform(jax.random.PRNGKey(2), (2, 3, 1))
  got = jax.jit(distill.ar_targets, static_argnums=0)(small_cfg, params,
                                                      tokens, windows, u)
  for r in range(2):
    for w in range(3):
      t = int(windows[r, w])
      out = decode.generate(params, small_cfg, [np.asarray(tokens[r, :t + 1])],
                            max_new_tokens=1, prompt_width=10,
                            noise=np.asarray(u[r:r + 1, w]))
      assert out.tokens[0, 0] == got[r, w, 0]


def test_ar_targets_at_a_teacher_temperature(small_cfg, monkeypatch):
  # distill.teacher_temperature: stage 1's targets are the teacher's
  # inverse-CDF tokens at that temperature, as its own sampler draws them.
  params = model_lib.init_params(small_cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 0, 61)
  stage = distill.Stage(window=1, method='self_forcing',
                        student_cfg=distill.student_config(small_cfg, 1),
                        source_cfg=small_cfg, num_windows=4,
                        teacher_temperature=0.1)
  seen = []
  real = distill.ar_targets

  def recording(*args):
    seen.append(args)
    return real(*args)

  monkeypatch.setattr(distill, 'ar_targets', recording)
  extras = stage.extras(jax.random.PRNGKey(5), tokens, params)
  assert seen[-1][-1] == 0.1
  # Sharpened tenfold, the teacher's CDF moves: the same u give other
  # tokens than at temperature 1.
  at_one = real(small_cfg, params, tokens, extras['windows'], extras['u'])
  assert (np.asarray(at_one) != np.asarray(extras['targets'])).any()
  for r in range(2):
    for w in range(4):
      t = int(extras['windows'][r, w])
      out = decode.generate(params, small_cfg, [np.asarray(tokens[r, :t + 1])],
                            max_new_tokens=1, prompt_width=10,
                            temperature=0.1,
                            noise=np.asarray(extras['u'][r:r + 1, w]))
      assert out.tokens[0, 0] == extras['targets'][r, w, 0]


def test_teacher_temperature_and_readout_are_for_self_forcing_only():
  config = defaults.base_config()
  config.distill.method = 'noise_inversion'
  config.distill.teacher_temperature = 1.2
  with pytest.raises(ValueError, match='distill.teacher_temperature=1.2 is '
                     'for self-forcing; noise inversion targets the data'):
    defaults.validate(config)
  config.distill.teacher_temperature = 1.0
  config.distill.readout = 'sample'
  with pytest.raises(ValueError, match="distill.readout='sample' is for "
                     'self-forcing; noise inversion targets the data'):
    defaults.validate(config)
  config.distill.method = 'self_forcing'
  config.distill.readout = 'argmax'
  config.distill.readout_temperature = 0.8
  with pytest.raises(ValueError, match='distill.readout_temperature=0.8 is '
                     "for distill.readout='sample' or 'median'; the argmax "
                     'has none'):
    defaults.validate(config)


def test_noise_inversion_u_reproduces_the_data_tokens(small_cfg):
  params = model_lib.init_params(small_cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 0, 61)
  windows = jnp.array([[0, 5], [2, 3]])
  u, targets = distill.inversion_targets(jax.random.PRNGKey(3), small_cfg,
                                         params, tokens, windows, 3)
  for r in range(2):
    for w in range(2):
      t = int(windows[r, w])
      np.testing.assert_array_equal(targets[r, w], tokens[r, t + 1:t + 4])
      # The teacher's own sampler, fed these u, emits exactly the data.
      out = decode.generate(params, small_cfg, [np.asarray(tokens[r, :t + 1])],
                            max_new_tokens=3, prompt_width=10,
                            noise=np.asarray(u[r:r + 1, w]))
      np.testing.assert_array_equal(out.tokens[0], targets[r, w])


def test_transfer_copies_matching_params_only(small_cfg):
  teacher = model_lib.init_params(small_cfg, jax.random.PRNGKey(0))
  cfg, fresh = _student(small_cfg, 2, seed=1)
  params, copied, new = distill.transfer_params(teacher, fresh)
  assert new and all('noise_encoder' in p for p in new)
  np.testing.assert_array_equal(params['embed']['embedding'],
                                teacher['embed']['embedding'])
  np.testing.assert_array_equal(
      params['noise_encoder']['Dense_0']['kernel']
      if 'Dense_0' in params['noise_encoder'] else
      jax.tree.leaves(params['noise_encoder'])[0],
      jax.tree.leaves(fresh['noise_encoder'])[0])
  assert len(copied) == len(jax.tree.leaves(teacher))


def _stage_config(mesh_size):
  c = defaults.base_config()
  c.model.vocab_size, c.model.seq_len = 61, 16
  c.train.batch_size = 8
  c.train.lr, c.train.warmup_steps, c.train.eval_every = 1e-3, 1, 0
  c.train.checkpoint_every = 100
  c.mesh.data = mesh_size
  return c


@pytest.mark.parametrize('window', [1, 2])
def test_sharded_distillation_step_equals_one_device(small_cfg, tmp_path,
                                                      window):
  assert jax.device_count() == 8
  cfg = dataclasses.replace(small_cfg, seq_len=16)
  teacher = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  source_cfg = cfg if window == 1 else distill.student_config(cfg, 1)
  source = teacher if window == 1 else model_lib.init_params(
      source_cfg, jax.random.PRNGKey(9))
  stage = distill.Stage(window=window, method='self_forcing',
                        student_cfg=distill.student_config(cfg, window),
                        source_cfg=source_cfg, num_windows=4)
  data = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (64, 16), 0,
                                       61), np.int32)
  results = []
  for size in (1, 8):
    task = distill.stage_task(stage, init_from=source, frozen=source)
    r = train_lib.train(task, _stage_config(size), str(tmp_path / str(size)),
                        helpers.ArrayIterator(data, 8), num_steps=3)
    results.append(r.state.params)
  # Same math, different reduction order across devices: f32 rounding only.
  assert helpers.max_abs_diff(results[0], results[1]) < 1e-5
  # It trained: the copied backbone moved away from its source.
  assert helpers.max_abs_diff(results[0]['embed'], source['embed']) > 1e-4


@pytest.mark.parametrize('window', [1, 2])
def test_sharded_step_gradients_equal_one_device(small_cfg, window):
  """With SGD(lr=1) the update is the gradient itself: no Adam rescaling
  can hide a wrong cross-device reduction (e.g. a sum instead of a mean)."""
  cfg = dataclasses.replace(small_cfg, seq_len=16)
  source_cfg = cfg if window == 1 else distill.student_config(cfg, 1)
  source = model_lib.init_params(source_cfg, jax.random.PRNGKey(9))
  stage = distill.Stage(window=window, method='self_forcing',
                        student_cfg=distill.student_config(cfg, window),
                        source_cfg=source_cfg, num_windows=4)
  task = distill.stage_task(stage, init_from=source, frozen=source)
  batch = jax.random.randint(jax.random.PRNGKey(1), (8, 16), 0, 61)
  out = [helpers.sgd_update(task, _stage_config(size).mesh, batch, source)
         for size in (1, 8)]
  assert helpers.max_abs_diff(out[0][0], out[1][0]) < 1e-6
  for name in out[0][1]:
    np.testing.assert_allclose(out[0][1][name], out[1][1][name], rtol=1e-5,
                               err_msg=name)


def test_teacher_is_not_in_the_optimizer_state(small_cfg):
  teacher = model_lib.init_params(small_cfg, jax.random.PRNGKey(0))
  stage = distill.Stage(window=1, method='self_forcing',
                        student_cfg=distill.student_config(small_cfg, 1),
                        source_cfg=small_cfg, num_windows=2)
  task = distill.stage_task(stage, init_from=teacher, frozen=teacher)
  opt = train_lib.make_optimizer(_stage_config(1).train)
  state = train_lib.init_state(task, opt, jax.random.PRNGKey(0), ema=False)
  adam = [s for s in jax.tree.leaves(
      state.opt_state, is_leaf=lambda x: hasattr(x, 'mu'))
           if hasattr(s, 'mu')][0]
  # Adam keeps moments for exactly the student's parameters, no teacher's.
  assert jax.tree.structure(adam.mu) == jax.tree.structure(state.params)
  assert 'noise_encoder' in adam.mu
  n_params = len(jax.tree.leaves(state.params))
  scalars = 2  # Adam's step count and the schedule's.
  assert len(jax.tree.leaves(state.opt_state)) == 2 * n_params + scalars


def test_check_fit_names_the_mismatch(small_cfg):
  other = dataclasses.replace(small_cfg, d_model=64, noise_window=2)
  with pytest.raises(ValueError, match='d_model: teacher=32 vs student=64'):
    distill.check_fit(small_cfg, other)


def test_decoding_k_beyond_the_trained_window_is_refused(small_cfg):
  cfg, params = _student(small_cfg, 2)
  with pytest.raises(ValueError, match='k=3 not allowed.*window 2'):
    decode.generate(params, cfg, [[1, 2]], max_new_tokens=6, k=3)


def test_noise_outside_unit_interval_is_refused(small_cfg):
  cfg, params = _student(small_cfg, 2)
  with pytest.raises(ValueError, match=r'noise u must be finite and in '
                     r'\[0, 1\).* first u\[0, 1\]=-0.5'):
    decode.generate(params, cfg, [[1, 2]], max_new_tokens=2, k=2,
                    noise=np.array([[0.1, -0.5]]))


def test_missing_teacher_checkpoint_is_reported(tmp_path):
  from kforcing_jax import commands  # pylint: disable=g-import-not-at-top
  c = defaults.base_config()
  with pytest.raises(checkpoints.CheckpointError, match='no checkpoint'):
    commands.run_distill(c, str(tmp_path))
  assert not os.path.exists(tmp_path / 'student_k1')


def test_float64_precision_without_x64_is_refused_first(tmp_path):
  from kforcing_jax import commands  # pylint: disable=g-import-not-at-top
  c = defaults.base_config()
  c.distill.precision = 'float64'
  assert not jax.config.jax_enable_x64
  # Before the teacher is even looked for: it used to fail at step 0.
  with pytest.raises(ValueError, match="distill.precision='float64': "
                     ".*JAX_ENABLE_X64=1"):
    commands.run_distill(c, str(tmp_path))


@pytest.mark.parametrize('method', ['self_forcing', 'noise_inversion'])
def test_resumed_stage_equals_uninterrupted(small_cfg, tmp_path, method):
  # Stop a stage at step 2 (checkpoint), resume to 4: bitwise the same
  # student and losses as 4 steps in one go (noise, targets, data order
  # and the frozen source all come back). noise_inversion also runs a
  # whole stage of the baseline here.
  cfg = dataclasses.replace(small_cfg, seq_len=16)
  window = 2
  source_cfg = (distill.student_config(cfg, 1) if method == 'self_forcing'
                else cfg)
  source = model_lib.init_params(source_cfg, jax.random.PRNGKey(9))
  stage = distill.Stage(window=window, method=method,
                        student_cfg=distill.student_config(cfg, window),
                        source_cfg=source_cfg, num_windows=4)
  data = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (64, 16), 0,
                                       61), np.int32)
  config = _stage_config(1)
  config.train.checkpoint_every = 2
  config.train.log_every = 1
  runs = {}
  for name, stops in (('straight', (4,)), ('resumed', (2, 4))):
    for steps in stops:
      task = distill.stage_task(stage, init_from=source, frozen=source)
      r = train_lib.train(task, config, str(tmp_path / name),
                          helpers.ArrayIterator(data, 8), num_steps=steps)
    with open(os.path.join(r.run_dir, 'metrics.jsonl')) as f:
      losses = [json.loads(l)['loss'] for l in f if '"loss"' in l]
    runs[name] = (r.state, losses)
  (a, la), (b, lb) = runs['straight'], runs['resumed']
  assert helpers.max_abs_diff(a.params, b.params) == 0.0
  assert helpers.max_abs_diff(a.opt_state, b.opt_state) == 0.0
  assert la == lb and len(la) == 4 and all(np.isfinite(la))


def test_sample_windows_are_distinct_valid_context_positions():
  # Window t's slots predict tokens t+1..t+k, so t + k <= N - 1.
  n, k = 16, 4
  w = np.asarray(distill.sample_windows(jax.random.PRNGKey(0), 64, n, k, 5))
  assert w.shape == (64, 5)
  assert w.min() >= 0 and w.max() <= n - 1 - k
  assert all(len(set(row)) == 5 for row in w.tolist())
  assert len(set(w[:, 0].tolist())) > 5  # Rows draw their own windows.
  every = np.asarray(distill.sample_windows(jax.random.PRNGKey(0), 2, n, k, 0))
  np.testing.assert_array_equal(every, np.tile(np.arange(n - k), (2, 1)))
  with pytest.raises(ValueError, match='k=4 needs sequences longer than 5'):
    distill.sample_windows(jax.random.PRNGKey(0), 2, 4, k, 0)


def test_sharded_step_draws_different_dropout_masks_per_device(small_cfg):
  """The shard_map step gets one replicated rng; each device must still
  draw its own dropout masks. Every device gets the same row and noise: if
  the masks were the same too, the mean gradient over 8 devices would equal
  the gradient of that row alone on one device."""

  def grads(dropout_rate, size):
    cfg = dataclasses.replace(small_cfg, seq_len=16, dropout_rate=dropout_rate)
    source = model_lib.init_params(cfg, jax.random.PRNGKey(9))
    stage = distill.Stage(window=1, method='self_forcing',
                          student_cfg=distill.student_config(cfg, 1),
                          source_cfg=cfg, num_windows=4)
    task = distill.stage_task(stage, init_from=source, frozen=source)
    first_row = task.extras_fn
    task = dataclasses.replace(task, extras_fn=lambda rng, b, f: jax.tree.map(
        lambda x: jnp.broadcast_to(x, (b.shape[0],) + x.shape[1:]),
        first_row(rng, b[:1], f)))
    row = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (1, 16), 0, 61))
    delta, _ = helpers.sgd_update(task, _stage_config(size).mesh,
                                  np.tile(row, (size, 1)), source)
    return delta

  # Control: without dropout the two set-ups give the same gradient (to
  # f32 rounding of the 8-way mean).
  assert helpers.max_abs_diff(grads(0.0, 1), grads(0.0, 8)) < 1e-5
  assert helpers.max_abs_diff(grads(0.5, 1), grads(0.5, 8)) > 1e-3


def test_students_take_the_configs_noise_encoder_fields(tmp_path, capsys,
                                                       monkeypatch):
  # model.noise_* are student-only: distill used to copy them from the
  # teacher's checkpoint, silently ignoring the config. Now the students
  # take them, a student trained with other values is refused by name,
  # and the teacher (which has no noise encoder) is not.
  from kforcing_jax import commands  # pylint: disable=g-import-not-at-top
  from kforcing_jax import config_files  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_files.load_config(os.path.join(root, 'configs', 'tiny.py'))
  config.train.num_steps = 2
  config.train.eval_every = 2
  config.train.checkpoint_every = 2
  config.distill.windows = (1, 2)
  config.distill.steps_per_stage = 2
  workdir = str(tmp_path)
  commands.run_teacher(config, workdir)
  # The teacher's run records the workdir's data; later stages check it.
  with open(os.path.join(workdir, 'data.json')) as f:
    assert json.load(f)['max_documents'] == 12
  config.data.max_documents = 13
  with pytest.raises(ValueError, match='data.max_documents was 12, now 13'):
    commands.run_distill(config, workdir)
  config.data.max_documents = 12
  config.model.noise_scale = 77.0
  config.model.noise_mlp_dim = 24
  config.distill.teacher_temperature = 1.5
  config.distill.readout = 'sample'
  config.distill.readout_temperature = 0.9
  temperatures, readouts = [], []
  real_targets = distill.ar_targets
  monkeypatch.setattr(distill, 'ar_targets', lambda *a: (
      temperatures.append(a[-1]), real_targets(*a))[1])
  real_rollout = distill.self_forcing_targets
  monkeypatch.setattr(distill, 'self_forcing_targets', lambda *a: (
      readouts.append((a[6], a[8])), real_rollout(*a))[1])
  commands.run_distill(config, workdir)
  assert set(temperatures) == {1.5}  # Stage 1's targets, at the config's.
  # Stage 2's, read out as configured, and said so.
  assert set(readouts) == {('sample', 0.9)}
  assert ('[student_k2] stage k=2 (self_forcing) from student_k1 (its '
          'sample readout at temperature 0.9)') in capsys.readouterr().out
  for run in ('student_k1', 'student_k2'):
    cfg, params, meta = checkpoints.load_params(os.path.join(workdir, run))
    assert (cfg.noise_scale, cfg.noise_mlp_dim) == (77.0, 24)
    assert params['noise_encoder']['mlp_in']['kernel'].shape[1] == 24
    assert meta['config']['distill']['readout'] == 'sample'
  config.model.dtype = 'bfloat16'  # Not the teacher's: said, before the
  with pytest.raises(checkpoints.CheckpointError, match='model.dtype'):
    commands.run_distill(config, workdir)  # finished student refuses it.
  assert ("[distill] NOTE: the students take model.dtype='bfloat16' "
          "(teacher: 'float32') from --config") in capsys.readouterr().out
  config.model.dtype = 'float32'
  commands.run_distill(config, workdir)  # Every stage finished: skipped.
  out = capsys.readouterr()
  assert 'NOTE' not in out.out
  assert 'stage k=2 finished (step 2): skipped' in out.out
  assert '[data] train split' not in out.err  # Their data is never drawn.
  config.model.noise_scale = 5.0
  result = commands.run_teacher(config, workdir)  # Finished: skipped.
  assert int(result.state.step) == 2
  out = capsys.readouterr()
  assert '[teacher] finished (step 2): skipped' in out.out
  assert '[data] train split' not in out.err  # Its data is never drawn.
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'model.noise_scale: checkpoint=77.0 vs '
                           r'config=5.0'):
    commands.run_distill(config, workdir)
  # Fewer steps than were trained: skipped, and said to be past them.
  config.model.noise_scale = 77.0
  config.train.num_steps = config.distill.steps_per_stage = 1
  commands.run_teacher(config, workdir)
  commands.run_distill(config, workdir)
  out = capsys.readouterr().out
  assert ('[teacher] finished (step 2, past train.num_steps=1 (kept as '
          'trained)): skipped') in out
  assert ('stage k=2 finished (step 2, past distill.steps_per_stage=1 '
          '(kept as trained)): skipped') in out


@pytest.mark.parametrize('stage_steps', [(3, 0, 3), (3, True, 3), (3, 2.0, 3),
                                         (3, 3, 3, 3)])
def test_stage_steps_must_give_each_window_a_positive_int(stage_steps):
  config = defaults.base_config()
  config.distill.stage_steps = stage_steps
  with pytest.raises(ValueError, match=re.escape(
      f'distill.stage_steps={stage_steps}: need one int >= 1 per window')):
    defaults.validate(config)


def test_stage_steps_give_each_stage_its_own_length(tmp_path, capsys):
  # distill.stage_steps sets each stage's steps (stages 2 and 4 may want
  # more); steps_per_stage is then unused. Resuming, skipping and the
  # unfinished-run notes follow it.
  from kforcing_jax import commands  # pylint: disable=g-import-not-at-top
  from kforcing_jax import config_files  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_files.load_config(os.path.join(root, 'configs', 'tiny.py'))
  config.train.num_steps = config.train.eval_every = 1
  config.distill.windows = (1, 2)
  config.distill.steps_per_stage = 5
  config.distill.stage_steps = (1, 4)
  config.distill.checkpoint_every = 2
  workdir = str(tmp_path)
  commands.run_teacher(config, workdir)
  results = commands.run_distill(config, workdir)
  assert [int(r.state.step) for r in results] == [1, 4]
  config.distill.stage_steps = (1, 3)
  capsys.readouterr()
  commands.run_distill(config, workdir)
  assert ('stage k=2 finished (step 4, past distill.stage_steps[1]=3 '
          '(kept as trained)): skipped') in capsys.readouterr().out
  config.distill.stage_steps = (1, 5)
  records = checkpoints.workdir_records(workdir)
  assert checkpoints.unfinished_runs(records, config, workdir) == [
      'student_k2 is at step 4 of distill.stage_steps[1]=5 (unfinished)']
  # A stage stopped after its step-2 checkpoint, read with a config that
  # asks fewer steps: short of its own run's 4, said only given the workdir.
  shutil.rmtree(os.path.join(workdir, 'student_k2', 'checkpoints', '4'))
  config.distill.stage_steps = (1, 1)
  records = checkpoints.workdir_records(workdir)
  assert checkpoints.unfinished_runs(records, config) == []
  assert checkpoints.unfinished_runs(records, config, workdir) == [
      'student_k2 is at step 2 of the 4 its last run was started with '
      '(unfinished: a re-run of that command resumes it)']
  config.distill.stage_steps = (1, 5)
  results = commands.run_distill(config, workdir)
  assert [int(r.state.step) for r in results] == [1, 5]
  out = capsys.readouterr().out
  assert 'stage k=1 finished (step 1): skipped' in out
  assert '[student_k2] resuming from the checkpoint at step 2 of 5' in out
  # Without stage_steps, every stage has steps_per_stage again.
  config.distill.stage_steps = ()
  records = checkpoints.workdir_records(workdir)
  assert checkpoints.unfinished_runs(records, config, workdir) == [
      'student_k1 is at step 1 of distill.steps_per_stage=5 (unfinished)']


def test_stage_steps_map_to_windows_in_order():
  config = defaults.base_config()
  config.distill.stage_steps = (7, 8, 9)
  assert [defaults.stage_steps(config.distill, w) for w in (1, 2, 4, 8)] == [
      ('distill.stage_steps[0]', 7), ('distill.stage_steps[1]', 8),
      ('distill.stage_steps[2]', 9), ('distill.steps_per_stage', 300)]
  config.distill.method = 'noise_inversion'
  config.distill.windows = (2, 2)
  config.distill.stage_steps = (1, 2)  # Would give one window two counts.
  with pytest.raises(ValueError,
                     match=re.escape('distill.windows=(2, 2): each window '
                                     'once')):
    defaults.validate(config)


@pytest.mark.parametrize('name', ['lm1b', 'owt'])
def test_paper_configs_distill_with_the_authors_recipe(name):
  # docs/METHOD.md: batch 512, lr 1e-4, grad clip 1.0, EMA 0.999 (Adam
  # (0.9, 0.999) and the constant schedule are stage_config's for every
  # config); not the demo's 16 x 1e-3 without EMA.
  import importlib.util  # pylint: disable=g-import-not-at-top
  from kforcing_jax import commands  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(root, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  defaults.validate(config)
  tc = commands.stage_config(config, 4).train  # What stage 4 trains with.
  assert (tc.batch_size, tc.lr, tc.ema_decay) == (512, 1e-4, 0.999)
  assert tc.grad_clip == 1.0
  assert tc.num_steps == config.distill.steps_per_stage >= 10_000
