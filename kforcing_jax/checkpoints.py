"""Orbax checkpoints of a run: train state, data-iterator state, metadata.

Layout: `<run_dir>/checkpoints/<step>/{state,data,meta}`. `meta` holds the
model config and the experiment config so a run can be reloaded (generate,
distill) without the config file, and so a resumed run with a different
model is refused before anything is computed or written.
"""

import dataclasses
import json
import os
import pathlib
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from kforcing_jax import defaults
from kforcing_jax import model as model_lib


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable, or does not fit the config."""


def run_meta(model_cfg: model_lib.ModelConfig, config) -> dict[str, Any]:
  return {'model': model_cfg.to_dict(),
          'config': json.loads(config.to_json_best_effort())}


def source_record(run: str, step: int, meta: dict[str, Any]) -> dict:
  """What a run trained from: `run` at `step`, and that run's id (from its
  checkpoint `meta`; runs saved before ids have none). The id tells a run
  trained anew, to the same step, from the one a student was made from."""
  record = {'run': run, 'step': int(step)}
  if meta.get('run_id'):
    record['run_id'] = meta['run_id']
  return record


def same_source(a: dict[str, Any], b: dict[str, Any]) -> bool:
  """Whether two source records name one checkpoint: the same run and step,
  and the same run id where both have one."""
  return (a['run'] == b['run'] and a['step'] == b['step'] and
          (not a.get('run_id') or not b.get('run_id') or
           a['run_id'] == b['run_id']))


def describe_change(was: dict[str, Any], now: dict[str, Any] | None) -> str:
  """How source `was` differs from `now` (None: it has no checkpoint now),
  e.g. 'teacher at step 40, which is now at step 80'."""
  head = f"{was['run']} at step {was['step']}"
  if now is None:
    return f'{head}, which has no checkpoint now'
  if was['run'] != now['run']:
    return f"{head}; its source is now {now['run']} at step {now['step']}"
  if was['step'] != now['step']:
    return f"{head}, which is now at step {now['step']}"
  return f'{head}, which was trained anew since, to the same step'


def run_record(workdir: str, run: str) -> dict[str, Any] | None:
  """`source_record` of `run`'s latest checkpoint in `workdir`, None when
  it has none."""
  manager = Manager(os.path.join(workdir, run))
  step = manager.latest_step()
  if step is None:
    return None
  return source_record(run, step, manager.read_meta(step))


def workdir_records(workdir: str) -> dict[str, dict[str, Any]]:
  """{run: {'step', 'run_id'}} of every run in `workdir` that has a
  checkpoint (no run_id for runs saved before ids): what a result file
  (eval.json, bench.json) records, so that a later re-run can tell a run
  trained since from one it did not use."""
  out = {}
  for run in sorted(os.listdir(workdir)):
    if os.path.isdir(os.path.join(workdir, run, 'checkpoints')):
      try:
        record = run_record(workdir, run)
      except CheckpointError:  # Left out: a run that is read names it.
        continue
      if record is not None:
        out[run] = {k: v for k, v in record.items() if k != 'run'}
  return out


def runs_newer_than(workdir: str, name: str) -> list[str]:
  """Runs in `workdir` whose latest checkpoint is not one result file
  `name` saw: by the checkpoints it records of every run (step and run
  id), else (files from before that record) by file times, which a copied
  workdir renews."""
  path = os.path.join(workdir, name)
  try:
    with open(path) as f:
      recorded = json.load(f).get('checkpoints')
  except (OSError, ValueError, AttributeError):
    recorded = None  # A damaged file: report names it.
  written = os.path.getmtime(path)
  newer = []
  for run, now in workdir_records(workdir).items():
    if isinstance(recorded, dict):
      record = recorded.get(run)
      if not (isinstance(record, dict) and 'step' in record and
              same_source(dict(record, run=run), dict(now, run=run))):
        newer.append(run)
    elif os.path.getmtime(os.path.join(workdir, run, 'checkpoints',
                                       str(now['step']))) > written:
      newer.append(run)
  return newer


def check_records(records, where: str) -> None:
  """A result file's 'checkpoints' map: {run: {'step': int, 'run_id':
  str (optional)}}; raises ValueError naming `where`."""
  if not isinstance(records, dict):
    raise ValueError(f'{where}: checkpoints must be an object')
  for run, record in records.items():
    if (not isinstance(record, dict) or
        not isinstance(record.get('step'), int) or
        isinstance(record.get('step'), bool) or
        not isinstance(record.get('run_id', ''), str)):
      raise ValueError(f'{where}: checkpoints.{run} must be {{"step": int, '
                       f'"run_id": str}} (run_id optional), not {record!r}')


def unfinished_runs(records: dict[str, dict], config,
                    workdir: str | None = None) -> list[str]:
  """'RUN is at step S of FIELD=N (unfinished)' for each recorded run short
  of the step count `config` gives it (the teacher: train.num_steps; a
  student_k<w>: its stage's, defaults.stage_steps), and, given the runs'
  `workdir`, for each run short of the steps its own last run was started
  with (a run stopped early, read with a config that asks fewer)."""
  out = []
  for run, record in records.items():
    field, target = (('train.num_steps', config.train.num_steps)
                     if run == 'teacher' else
                     defaults.stage_steps(config.distill, _window_of(run)))
    step = record['step']
    if step < target:
      out.append(f'{run} is at step {step} of {field}={target} (unfinished)')
      continue
    if workdir is None:
      continue
    # A stage's saved config holds its own step count in train.num_steps.
    meta = Manager(os.path.join(workdir, run)).read_meta(step)
    planned = ((meta.get('config') or {}).get('train') or {}).get('num_steps')
    if isinstance(planned, int) and step < planned:
      out.append(f'{run} is at step {step} of the {planned} its last run '
                 'was started with (unfinished: a re-run of that command '
                 'resumes it)')
  return out


def _state_to_dict(state) -> dict[str, Any]:
  d = {'step': state.step, 'params': state.params,
       'opt_state': state.opt_state, 'rng': state.rng}
  if state.ema_params is not None:
    d['ema_params'] = state.ema_params
  return d


class Manager:
  """A thin wrapper over ocp.CheckpointManager with clear errors."""

  def __init__(self, run_dir: str, keep: int = 2):
    self.directory = os.path.abspath(os.path.join(run_dir, 'checkpoints'))
    self._keep = keep
    self._manager = None

  @property
  def manager(self) -> ocp.CheckpointManager:
    if self._manager is None:
      self._manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(max_to_keep=self._keep,
                                               create=True))
    return self._manager

  def latest_step(self) -> int | None:
    if not os.path.isdir(self.directory):
      return None
    return self.manager.latest_step()

  def restore(self, step: int, **items):
    """Restores the named items of `step`; damage -> CheckpointError."""
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax raises many types for damaged files.
      # The first line says what failed; the rest can be a 1000-line
      # TensorStore spec.
      lines = str(e).strip().splitlines() or ['']
      # And the first line can end in a pointer to that spec, which says
      # nothing to a reader ("See full TensorStore details: <bound ...").
      first = lines[0].split(' See full TensorStore details')[0]
      reason = first[:300] + (' ...' if len(lines) > 1 or len(first) > 300
                              else '')
      earlier = [s for s in self.manager.all_steps() if s < step]
      hint = (f'; the previous checkpoint is step {max(earlier)}: move '
              f'{self.directory}/{step} aside to resume from it'
              if earlier else '')
      raise CheckpointError(
          f'checkpoint {self.directory}/{step} is unreadable (corrupt, '
          f'incomplete, or saved on a device layout this run cannot '
          f'restore): {type(e).__name__}: {reason}{hint}') from e

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    return self.restore(step, meta=ocp.args.JsonRestore())['meta']

  def check_compatible(self, meta: dict[str, Any]) -> dict[str, Any] | None:
    """Refuses to resume a run whose checkpoint has another model config.

    Returns the saved meta (None when there is no checkpoint yet).
    """
    if self.latest_step() is None:
      return None
    saved_meta = self.read_meta()
    saved = saved_meta['model']
    # A teacher does not read the noise encoder's fields: changing them (for
    # the students) must not make its checkpoint "another model".
    ignored = (() if meta['model'].get('noise_window') or
               saved.get('noise_window') else model_lib.NOISE_FIELDS)
    # A field added after the checkpoint was written has its default there.
    defaults = {f.name: f.default for f in dataclasses.fields(
        model_lib.ModelConfig) if f.default is not dataclasses.MISSING}
    diff = {k: (saved.get(k, defaults.get(k)), v)
            for k, v in meta['model'].items()
            if k not in ignored and saved.get(k, defaults.get(k)) != v}
    if diff:
      fields = ', '.join(f'model.{k}: checkpoint={a!r} vs config={b!r}'
                         for k, (a, b) in sorted(diff.items()))
      raise CheckpointError(
          f'{self.directory} holds a checkpoint of a different model ({fields})'
          '. Use another --workdir or the original config; nothing was '
          'changed.')
    # Turning EMA or clipping on or off changes the saved state's tree, which
    # orbax would report as a corrupt checkpoint.
    saved_train = saved_meta.get('config', {}).get('train', {})
    train = meta.get('config', {}).get('train', {})
    for name, what, fields in (
        ('ema_decay', 'EMA params',
         'train.ema_decay; for a student distill.ema_decay'),
        ('grad_clip', 'a clipping state', 'train.grad_clip')):
      if name in saved_train and name in train and (
          bool(saved_train[name]) != bool(train[name])):
        raise CheckpointError(
            f'{self.directory}: its checkpoint was trained with '
            f'{name}={saved_train[name]!r}, this config has '
            f'{train[name]!r}; on/off changes the training state '
            f'({what}), so it cannot resume. Use the original value '
            f'({fields}) or another --workdir; nothing was changed.')
    return saved_meta

  def restore_latest(self, abstract_state, shardings):
    """(state, data_state) of the latest step, or None when there is none."""
    step = self.latest_step()
    if step is None:
      return None
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        _state_to_dict(abstract_state), _state_to_dict(shardings))
    out = self.restore(step, state=ocp.args.StandardRestore(target),
                       data=ocp.args.JsonRestore())
    d = out['state']
    state = abstract_state.replace(
        step=d['step'], params=d['params'], opt_state=d['opt_state'],
        rng=d['rng'], ema_params=d.get('ema_params'))
    return state, out['data']

  def save(self, state, data_state: dict, meta: dict):
    self.manager.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(_state_to_dict(state)),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)))

  def wait(self):
    if self._manager is not None:
      self._manager.wait_until_finished()


def _window_of(run: str) -> int:
  """w of a `student_k<w>` run name; 0 for any other name."""
  m = re.fullmatch(r'student_k(\d+)', run)
  return int(m.group(1)) if m else 0


def trained_windows(workdir: str) -> list[int]:
  """Windows w of the `student_k<w>` runs in workdir that have checkpoints."""
  if not os.path.isdir(workdir):
    return []
  out = []
  for d in os.listdir(workdir):
    w = _window_of(d)
    if w and os.path.isdir(os.path.join(workdir, d, 'checkpoints')):
      out.append(w)
  return sorted(out)


def _local_target(manager: 'Manager', step: int):
  """Restore target that loads a checkpoint saved on any devices and
  processes (without a target, orbax needs the saved layout): every array
  on this process's first device, or in a multi-process run replicated
  over all devices (a teacher trained on one host, distilled on a pod)."""
  try:
    tree = ocp.StandardCheckpointHandler().metadata(
        pathlib.Path(manager.directory, str(step), 'state')).tree
  except Exception:  # pylint: disable=broad-except
    return None  # Damaged metadata: restore() reports it by name.
  if jax.process_count() > 1:
    placement = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(jax.devices()), ('all',)),
        jax.sharding.PartitionSpec())
  else:
    placement = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement),
      tree)


def load_params(run_dir: str, use_ema: bool = True):
  """(ModelConfig, params, meta) of the latest checkpoint in run_dir.

  params are the EMA copy where training kept one, unless use_ema=False.
  Whatever devices and processes saved them, a single-process run
  restores them onto its first local device, a multi-process run
  replicated over all devices.
  """
  if not isinstance(use_ema, (bool, np.bool_)):  # "no" would be truthy.
    raise ValueError(f'use_ema={use_ema!r} must be a bool')
  if not isinstance(run_dir, (str, os.PathLike)):
    raise ValueError(f'run_dir={run_dir!r} must be a path (the folder '
                     'holding checkpoints/)')
  run_dir = os.path.expanduser(os.fspath(run_dir))
  manager = Manager(run_dir)
  step = manager.latest_step()
  if step is None:
    raise CheckpointError(f'no checkpoint found in {manager.directory}; '
                          f'{_run_dir_hint(run_dir) or "train it first"}')
  meta = manager.read_meta(step)
  cfg = _model_config(meta, f'{manager.directory}/{step}')
  state = manager.restore(
      step, state=ocp.args.StandardRestore(_local_target(manager, step))
  )['state']
  params = state['ema_params'] if use_ema and 'ema_params' in state else (
      state['params'])
  try:
    model_lib.check_params(cfg, params)
  except ValueError as e:
    raise CheckpointError(f'checkpoint {manager.directory}/{step}: its '
                          f'parameters do not match its meta: {e}') from e
  return cfg, params, meta


def _run_dir_hint(run_dir: str) -> str | None:
  """Where a caller passed the checkpoints folder or a step folder instead
  of the run folder, which one to pass."""
  path = os.path.abspath(run_dir)
  for up in (path, os.path.dirname(path)):
    if (os.path.basename(up) == 'checkpoints' and
        Manager(os.path.dirname(up)).latest_step() is not None):
      return (f'{run_dir} is inside a run folder: pass the run folder, '
              f'{os.path.dirname(up)}, which holds checkpoints/')
  return None


def _model_config(meta: dict[str, Any], where: str) -> model_lib.ModelConfig:
  """The ModelConfig a checkpoint's meta records, or a CheckpointError
  saying what is wrong with it (not a bare KeyError or TypeError)."""
  saved = meta.get('model') if isinstance(meta, dict) else None
  if not isinstance(saved, dict):
    raise CheckpointError(f'checkpoint {where}: its meta has no model '
                          'config; was it written by kforcing_jax?')
  known = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
  unknown = sorted(set(saved) - known)
  if unknown:
    raise CheckpointError(
        f'checkpoint {where}: its model config has fields this kforcing_jax '
        f'does not know ({", ".join(unknown)}); was it written by another '
        'version?')
  try:
    return model_lib.ModelConfig(**saved)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f'checkpoint {where}: its model config is not '
                          f'valid: {e}') from e
