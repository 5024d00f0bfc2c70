"""One training loop for the AR teacher and every distillation stage.

A `Task` says what is trained (init, loss, optional frozen teacher); `train`
does the rest: optimizer, sharded step jitted once with donation, held-out
eval, metrics JSONL + progress bar, NaN/Inf guard, orbax checkpoints with the
data-iterator state (re-running resumes), SIGTERM or a first Ctrl-C -> save
and exit.
"""

import dataclasses
import json
import os
import signal
import threading
import time
import warnings
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from kforcing_jax import checkpoints
from kforcing_jax import files
from kforcing_jax import model as model_lib
from kforcing_jax import sharding as sharding_lib

# Integer batches can't be reused as outputs; donating them is still right
# (frees the buffer early) but XLA warns about it.
warnings.filterwarnings('ignore', message='Some donated buffers were not usable')


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  ema_params: Any  # None when train.ema_decay == 0.


@dataclasses.dataclass
class Task:
  """What one training run optimises.

  loss_fn(params, batch, extras, rng, frozen) -> (scalar loss, metrics dict)
    is evaluated on a device-local shard when `shard_map` is set, so it must
    only take means over its own batch (they are averaged across devices).
  extras_fn(rng, batch, frozen) -> pytree with a leading batch axis, computed
    on the global batch before the loss (e.g. distillation noise and teacher
    targets), so results do not depend on the number of devices.
  eval_fn(params, batch, frozen) -> dict of (sum, count) pairs.
  """
  name: str  # Run directory under the workdir, e.g. 'teacher', 'student_k2'.
  model_cfg: model_lib.ModelConfig
  # init_params(rng), or init_params(rng, init_source) when init_source is set.
  init_params: Callable[..., Any]
  loss_fn: Callable[..., Any]
  eval_fn: Callable[..., Any] | None = None
  extras_fn: Callable[..., Any] | None = None
  frozen: Any = None  # Frozen teacher params: inputs, never optimised.
  shard_map: bool = False  # Explicit per-device loss + gradient pmean.
  # Params the new model starts from (a distillation stage: the previous
  # run's). A jit argument of the init, never a closure: closed-over arrays
  # become HLO constants, and jit refuses ones spanning several processes.
  init_source: Any = None
  # {'run', 'step'} of the frozen model a distillation stage learns from,
  # saved in the checkpoint meta; resuming against another one warns that
  # the run is stale (e.g. the teacher trained on after it).
  source: dict | None = None


def make_optimizer(tc) -> optax.GradientTransformation:
  if tc.warmup_steps == 0 and tc.schedule in ('cosine', 'constant'):
    # No warm-up: the peak from the first update (a one-step ramp from 0
    # made that update a no-op).
    schedule = (optax.cosine_decay_schedule(tc.lr, max(tc.num_steps, 1),
                                            alpha=0.1)
                if tc.schedule == 'cosine' else optax.constant_schedule(tc.lr))
  elif tc.schedule == 'cosine':
    schedule = optax.warmup_cosine_decay_schedule(
        # optax needs decay_steps > warmup_steps (it counts the warm-up).
        0.0, tc.lr, max(tc.warmup_steps, 1),
        max(tc.num_steps, tc.warmup_steps + 1, 2),
        end_value=0.1 * tc.lr)
  elif tc.schedule == 'constant':
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, tc.lr, max(tc.warmup_steps, 1)),
         optax.constant_schedule(tc.lr)], [max(tc.warmup_steps, 1)])
  else:
    raise ValueError(f"train.schedule={tc.schedule!r}; expected 'cosine' or "
                     "'constant'")
  parts = [optax.clip_by_global_norm(tc.grad_clip)] if tc.grad_clip else []
  parts.append(optax.adamw(schedule, b1=tc.b1, b2=tc.b2,
                           weight_decay=tc.weight_decay))
  return optax.chain(*parts)


def ema_warmup(decay: float, updates):
  """The EMA decay after `updates` updates: min(decay, (1 + n) / (10 + n)).
  Without the warm-up the average starts at the init and keeps decay**n of
  it: 74% after the demo's 300 distillation steps at the paper's 0.999,
  and eval, distillation and decoding read that average."""
  updates = jnp.asarray(updates, jnp.float32)
  return jnp.minimum(decay, (1.0 + updates) / (10.0 + updates))


def init_state(task: Task, optimizer, rng, ema: bool,
               init_source=None) -> TrainState:
  init_rng, rng = jax.random.split(rng)
  # train() passes task.init_source traced; direct callers may omit it.
  source = task.init_source if init_source is None else init_source
  params = (task.init_params(init_rng) if source is None else
            task.init_params(init_rng, source))
  return TrainState(step=jnp.int32(0), params=params,
                    opt_state=optimizer.init(params), rng=rng,
                    ema_params=params if ema else None)


def make_step(task: Task, optimizer, ema_decay: float, mesh):
  """The pure step (state, batch) -> (state, metrics), not yet jitted."""

  def loss_fn(params, *args):
    if not task.shard_map:  # shard_map's P() in_spec gathers them already.
      params = sharding_lib.gather_for_compute(params, mesh)
    return task.loss_fn(params, *args)

  def local_grads(params, batch, extras, rng, frozen):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch, extras, rng, frozen)
    return grads, dict(metrics, loss=loss)

  if task.shard_map:
    def local(params, batch, extras, rng, frozen):
      # The rng comes in replicated; without this every device would draw
      # the same dropout masks for its (different) rows.
      rng = jax.random.fold_in(rng, jax.lax.axis_index(sharding_lib.DATA))
      grads, metrics = local_grads(params, batch, extras, rng, frozen)
      # Equal-size shards: the mean of per-device means is the global mean.
      return jax.lax.pmean((grads, metrics), sharding_lib.DATA)

    data = P(sharding_lib.DATA)
    # check_vma=False: with it, JAX would already psum the gradients of the
    # replicated params (8 devices -> 8x the mean); here each device keeps
    # its local gradient and the pmean above is the one explicit reduction.
    grads_and_metrics = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), data, data, P(), P()),
        out_specs=(P(), P()), check_vma=False)
  else:
    grads_and_metrics = local_grads

  def step(state: TrainState, batch, frozen):
    rng, step_rng, extras_rng = jax.random.split(state.rng, 3)
    extras = (task.extras_fn(extras_rng, batch, frozen)
              if task.extras_fn else None)
    grads, metrics = grads_and_metrics(state.params, batch, extras, step_rng,
                                       frozen)
    updates, opt_state = optimizer.update(grads, state.opt_state,
                                          state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      decay = ema_warmup(ema_decay, state.step + 1)
      ema = jax.tree.map(
          lambda e, p: (decay * e + (1 - decay) * p).astype(e.dtype), ema,
          params)
    metrics['grad_norm'] = optax.tree_utils.tree_norm(grads)  # global L2 norm
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      rng=rng, ema_params=ema), metrics

  return step


class _Preemption:
  """Turns SIGTERM (TPU VM preemption) and a first Ctrl-C (SIGINT) into a
  flag read at step boundaries: the loop saves, then stops. A second
  Ctrl-C interrupts at once (losing the steps since the last save)."""

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = None  # The signal's name once one arrived.
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self._SIGNALS:
        # A shell starts background jobs with SIGINT ignored, so that a
        # terminal's Ctrl-C does not reach them; keep it that way.
        if signal.getsignal(sig) is not signal.SIG_IGN:
          self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.requested:
      signal.signal(signal.SIGINT, self._previous[signal.SIGINT])
      raise KeyboardInterrupt
    self.requested = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _stop_now(preemption: _Preemption, step: int, every: int) -> str | None:
  """The signal name if the run stops after this step, else None.

  One process: as soon as it has a signal. Several: only every `every`
  steps, where all of them agree (any process's signal stops all), so
  they save and leave at the same step; deciding alone, one would meet
  the others' next collective and both would hang.
  """
  if jax.process_count() == 1:
    return preemption.requested
  if step % every:
    return None
  flags = multihost_utils.process_allgather(
      np.asarray(bool(preemption.requested), np.int32))
  if not np.any(flags):
    return None
  return preemption.requested or 'a signal to another process'


def _source_of_record(task: Task, saved_meta: dict | None) -> dict:
  """The source to save in this run's meta: the one it started from, so a
  resumed stage warns on every re-run, not only the first after a change."""
  saved = (saved_meta or {}).get('source')
  if (saved and not checkpoints.same_source(saved, task.source)
      and sharding_lib.is_main_process()):
    print(f'[{task.name}] WARNING: trained from '
          f'{checkpoints.describe_change(saved, task.source)}: {task.name} '
          'and the stages after it are stale; delete their run directories '
          'to redo them from it.', flush=True)
  return saved or task.source


# The settings that shape a run's weights (bookkeeping such as log_every or
# checkpoint_every left out); a finished or resumed run whose saved config
# differs in one is noted. Model fields are checked, and refused, apart
# (Manager.check_compatible), as is the data (data_record). The step count
# is not a recipe field: the step reached is said anyway, and training on
# past it is what resuming is for. data.shuffle_seed orders the batches:
# a resumed run given another reads on from its position in the new order
# (so within that epoch some chunks repeat and others are skipped).
TEACHER_RECIPE = ('seed', 'data.shuffle_seed') + tuple(f'train.{k}' for k in (
    'b1', 'b2', 'batch_size', 'ema_decay', 'grad_clip', 'lr', 'schedule',
    'warmup_steps', 'weight_decay'))
STUDENT_RECIPE = ('seed', 'data.shuffle_seed', 'train.b1',
                  'train.grad_clip') + tuple(
    f'distill.{k}' for k in ('batch_size', 'ema_decay', 'lr', 'method',
                             'num_windows', 'precision', 'readout',
                             'readout_temperature', 'teacher_temperature',
                             'warmup_steps'))
# Recipe fields of one kind of stage only: stage 1 (window 1) learns from
# the AR teacher, later stages from the previous student.
_FIRST_STAGE_ONLY = ('distill.teacher_temperature',)
_LATER_STAGES_ONLY = ('distill.readout', 'distill.readout_temperature')


def changed_recipe(task: Task, config, saved_meta: dict | None) -> list[str]:
  """'field: saved -> now' for each recipe field of the run's saved config
  that `config` sets otherwise (fields a saved config lacks are skipped)."""
  saved = (saved_meta or {}).get('config') or {}
  changed = []
  window = task.model_cfg.noise_window
  skipped = _LATER_STAGES_ONLY if window == 1 else _FIRST_STAGE_ONLY
  for field in STUDENT_RECIPE if window else TEACHER_RECIPE:
    if field in skipped:
      continue
    was, now, present = saved, config, True
    for part in field.split('.'):
      present = present and isinstance(was, dict) and part in was
      was = was.get(part) if present else None
      now = now.get(part) if now is not None else None
    # Through JSON, as the saved side was: a tuple reads back as a list.
    now = json.loads(json.dumps(now, default=str))
    if present and was != now:
      changed.append(f'{field}: {was!r} -> {now!r}')
  return changed


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  run_dir: str
  # A stop signal arrived: the state is saved and the caller should stop
  # too (also when it came in the last step, so the run is complete).
  preempted: bool = False
  last_eval: dict | None = None
  tokens_per_s: float = 0.0
  seconds: float = 0.0  # Wall time of this call (0 when nothing to do).
  run_id: str = ''  # Kept in its checkpoints; another when trained anew.


def train(task: Task, config, workdir: str, data_iter, eval_batches=(),
          *, num_steps: int | None = None, train_cfg=None,
          tokens_per_example: int | None = None) -> TrainResult:
  """Trains (or resumes) `task` in `workdir/task.name` up to num_steps."""
  tc = train_cfg or config.train
  num_steps = tc.num_steps if num_steps is None else num_steps
  run_dir = os.path.join(workdir, task.name)
  mesh = sharding_lib.make_mesh(config.mesh)
  sharding_lib.check_batch_divisible(
      tc.batch_size, mesh.shape[sharding_lib.DATA],
      'distill.batch_size' if task.model_cfg.noise_window else
      'train.batch_size')
  if task.shard_map and config.mesh.fsdp:
    raise ValueError('mesh.fsdp=True is not supported with the shard_map '
                     'distillation step; set --config.mesh.fsdp=False')
  manager = checkpoints.Manager(run_dir, keep=tc.keep_checkpoints)
  meta = checkpoints.run_meta(task.model_cfg, config)
  saved_meta = manager.check_compatible(meta)  # Before any compute or write.
  if task.source is not None:
    meta['source'] = _source_of_record(task, saved_meta)
  # Kept for the run's life: a run trained anew gets another (its
  # students then know they were made from a different model).
  meta['run_id'] = ((saved_meta or {}).get('run_id') or
                    sharding_lib.shared_random_id())

  optimizer = make_optimizer(tc)
  ema = tc.ema_decay > 0
  rng = jax.random.PRNGKey(config.seed)
  init_fn = lambda r, source: init_state(task, optimizer, r, ema, source)
  abstract = jax.eval_shape(init_fn, rng, task.init_source)
  shardings = TrainState(
      step=sharding_lib.replicated(mesh),
      params=sharding_lib.state_shardings(abstract.params, mesh,
                                          config.mesh.fsdp),
      opt_state=sharding_lib.state_shardings(abstract.opt_state, mesh,
                                             config.mesh.fsdp),
      rng=sharding_lib.replicated(mesh),
      ema_params=(None if not ema else sharding_lib.state_shardings(
          abstract.ema_params, mesh, config.mesh.fsdp)))
  frozen_sh = jax.tree.map(lambda _: sharding_lib.replicated(mesh),
                           task.frozen)
  frozen = jax.device_put(task.frozen, frozen_sh)

  restored = manager.restore_latest(abstract, shardings)
  if restored is None:
    # A source from load_params sits on one device when this is one process;
    # the init runs over the whole mesh. (Arrays already on the mesh's
    # devices, as in a multi-process run, stay where they are.)
    replicated = sharding_lib.replicated(mesh)
    source = jax.tree.map(
        lambda x: x if getattr(x, 'sharding', None) is not None and (
            x.sharding.device_set == replicated.device_set) else
        jax.device_put(x, replicated), task.init_source)
    state = jax.jit(init_fn, out_shardings=shardings)(rng, source)
  else:
    state, data_state = restored
    data_iter.set_state(data_state)
  start = int(state.step)
  metrics_path = os.path.join(run_dir, 'metrics.jsonl')
  if sharding_lib.is_main_process():
    os.makedirs(run_dir, exist_ok=True)
    _truncate_metrics(metrics_path, start)
    if restored is not None and start < num_steps:
      # Said aloud: the stage line before this describes a fresh start.
      print(f'[{task.name}] resuming from the checkpoint at step {start} of '
            f'{num_steps}', flush=True)
    changed = changed_recipe(task, config, saved_meta) if restored else []
    if changed:
      print(f"[{task.name}] NOTE: its checkpoint was trained with other "
            f"settings ({'; '.join(changed)}): " + (
                f'steps from {start} on use the new ones' if start < num_steps
                else f'kept as trained; delete {run_dir} to retrain with '
                'them'), flush=True)
    if start < num_steps and tc.warmup_steps > num_steps:
      # Legal (a short trial of a long recipe), but easy to miss.
      print(f'[{task.name}] NOTE: warmup_steps={tc.warmup_steps} > '
            f'{num_steps} steps: the learning rate stays below its peak '
            f'{tc.lr:g}', flush=True)
  if start >= num_steps:
    return TrainResult(state=state, run_dir=run_dir,
                       run_id=meta['run_id'])

  step_fn = jax.jit(
      make_step(task, optimizer, tc.ema_decay, mesh),
      in_shardings=(shardings, sharding_lib.batch_sharding(mesh), frozen_sh),
      out_shardings=(shardings, sharding_lib.replicated(mesh)),
      donate_argnums=(0, 1))
  eval_step = None
  if task.eval_fn is not None:
    eval_step = jax.jit(
        lambda p, b, f: task.eval_fn(
            sharding_lib.gather_for_compute(p, mesh), b, f),
        in_shardings=(shardings.ema_params if ema else shardings.params,
                      sharding_lib.batch_sharding(mesh), frozen_sh),
        out_shardings=sharding_lib.replicated(mesh))
    # Every process holds whole eval batches; each places its devices' rows.
    eval_batches = [sharding_lib.shard_full_batch(b, mesh)
                    for b in eval_batches]

  tokens_per_example = tokens_per_example or config.model.seq_len
  bar = tqdm(total=num_steps, initial=start, desc=task.name,
             disable=not sharding_lib.is_main_process(),
             dynamic_ncols=True, mininterval=1.0)
  last_eval = None
  pending = None  # (step, metrics) of the previous step, pulled one late.
  t0, tokens_done = time.time(), 0
  preempted = False
  with _Preemption() as preemption, jax.set_mesh(mesh):
    for step in range(start + 1, num_steps + 1):
      batch = sharding_lib.global_batch(next(data_iter), mesh)
      state, metrics = step_fn(state, batch, frozen)
      tokens_done += tc.batch_size * tokens_per_example
      if pending is not None:
        _log(pending, metrics_path, bar, tc, tokens_done, t0, manager)
      pending = (step, metrics)
      is_last = step == num_steps
      if eval_step is not None and tc.eval_every and (
          step % tc.eval_every == 0 or is_last):
        params = state.ema_params if ema else state.params
        last_eval = _evaluate(eval_step, params, eval_batches, frozen, step,
                              metrics_path)
        if sharding_lib.is_main_process():
          bar.write(f'[{task.name}] step {step}: ' + ', '.join(
              f'{k}={v:.4g}' for k, v in last_eval.items() if k != 'step'))
      # The last step's check comes after its save, below.
      stop = None if is_last else _stop_now(preemption, step, tc.log_every)
      if step % tc.checkpoint_every == 0 or is_last or stop:
        # Never save a state whose step produced a non-finite loss.
        _log(pending, metrics_path, bar, tc, tokens_done, t0, manager,
             last=is_last)
        pending = None
        manager.save(state, data_iter.get_state(), meta)
      if stop:
        break
    manager.wait()  # Under the handler: a signal cannot cut the write.
    if not stop:
      # Every step ran. A signal during the last one, its save included,
      # must still stop the caller (the next stage would install a fresh
      # handler and forget it), on every process alike: they agree once
      # more, now that the checkpoint is written.
      stop = _stop_now(preemption, step, 1)
    if stop:
      if sharding_lib.is_main_process():
        done = ' (the last: the run is complete)' if is_last else ''
        bar.write(f'[{task.name}] {stop}: saved step {step}{done}; re-run '
                  'the same command to resume')
      preempted = True
  bar.close()
  elapsed = max(time.time() - t0, 1e-9)
  result = TrainResult(state=state, run_dir=run_dir, run_id=meta['run_id'],
                       preempted=preempted,
                       last_eval=last_eval,
                       tokens_per_s=tokens_done / elapsed, seconds=elapsed)
  if preempted and preemption.requested == 'SIGINT':
    # Ctrl-C stops the caller too (a pipeline, a shell script, a notebook
    # cell), now that the checkpoint is safe.
    raise Interrupted(f'{task.name}: saved step {step}', result)
  return result


class Interrupted(KeyboardInterrupt):
  """Ctrl-C stopped a run after its checkpoint was saved."""

  def __init__(self, message: str, result: TrainResult):
    super().__init__(message)
    self.result = result  # What the run did before it stopped.


def _log(pending, path, bar, tc, tokens_done, t0, manager,
         last: bool = False):
  """Checks a step's metrics and writes them to metrics.jsonl at step 1,
  every train.log_every steps and at the run's last step (`last`: its
  final loss went unrecorded when log_every did not divide the steps)."""
  step, metrics = pending
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not all(np.isfinite(v) for v in metrics.values()):
    bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
    last = manager.latest_step()
    kept = ('no checkpoint was saved yet' if last is None else
            f'the last good checkpoint (step {last}) is kept in '
            f'{manager.directory}')
    raise FloatingPointError(
        f'non-finite training metrics at step {step}: {bad}. Stopped without '
        f'saving; {kept}. Lower the learning rate (train.lr; for a student '
        'distill.lr) or check the data.')
  rate = tokens_done / max(time.time() - t0, 1e-9)
  bar.update(step - bar.n)
  bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f'{rate:,.0f}',
                  refresh=False)
  if sharding_lib.is_main_process() and (step % tc.log_every == 0 or
                                         step == 1 or last):
    with open(path, 'a') as f:
      f.write(json.dumps(dict(step=step, tokens_per_s=rate, **metrics)) + '\n')


def _evaluate(eval_step, params, batches, frozen, step, path):
  totals = {}
  for batch in batches:
    for name, (s, n) in jax.device_get(eval_step(params, batch, frozen)).items():
      acc = totals.setdefault(name, [0.0, 0.0])
      acc[0] += float(s)
      acc[1] += float(n)
  result = {f'eval_{k}': s / max(n, 1) for k, (s, n) in totals.items()}
  if 'eval_loss' in result and 'eval_acc_slot1' not in result:
    # Perplexity of the AR teacher; a student's loss is against hard targets.
    result['eval_perplexity'] = float(np.exp(result['eval_loss']))
  result['step'] = step
  if sharding_lib.is_main_process():
    with open(path, 'a') as f:
      f.write(json.dumps(result) + '\n')
  return result


def _truncate_metrics(path: str, step: int):
  """Drops metric lines past the restored step (they will be redone), and
  any line cut short (a kill or a full disk mid-write), which would
  otherwise block every resume. Rewritten atomically: a kill now cannot
  lose the history."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    text = f.read()
  for line in text.splitlines(keepends=True):
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict) and row.get('step', 0) <= step:
      kept.append(line.rstrip('\n') + '\n')
  kept_text = ''.join(kept)
  # Written only if something goes: a finished run re-entered in a
  # read-only workdir (a shared teacher) writes nothing.
  if kept_text != text:
    files.atomic_write_text(path, kept_text)
