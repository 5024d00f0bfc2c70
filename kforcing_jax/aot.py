r"""Ahead-of-time compile of the train steps at paper scale, without params.

Lowers and compiles the teacher train step and the distillation step (stage
k=4 learning from a frozen k=2 student) exactly as `train.train` jits them,
from abstract inputs only: the train state comes from `jax.eval_shape`, the
batch and the frozen source model are `jax.ShapeDtypeStruct`s with
shardings, so nothing of the model is ever allocated. Reports XLA's
per-device memory analysis of each compiled step.

  python -m kforcing_jax.aot --config=configs/lm1b.py --devices=8 \
      [--config.model.num_layers=2] [--batch_size=64] [--replicated] \
      [--tpu_topology=v5e:2x4] [--out=aot.json]

Without --tpu_topology it compiles for `--devices` fake CPU devices (the
XLA CPU backend: its temp sizes differ from a TPU's, arguments and outputs
do not). With it, it compiles for that TPU slice through libtpu's
compile-only topology, which needs libtpu installed (no TPU needed).
"""

import dataclasses
import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
from jax.experimental import topologies
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from kforcing_jax import commands
from kforcing_jax import config_files
from kforcing_jax import defaults
from kforcing_jax import distill as distill_lib
from kforcing_jax import files
from kforcing_jax import model as model_lib
from kforcing_jax import sharding as sharding_lib
from kforcing_jax import teacher as teacher_lib
from kforcing_jax import train as train_lib

_MEMORY_FIELDS = ('argument_size_in_bytes', 'output_size_in_bytes',
                  'alias_size_in_bytes', 'temp_size_in_bytes',
                  'generated_code_size_in_bytes')

TEACHER = 'teacher'
DISTILL = 'distill_k4_from_k2'


def _abstract(tree, shardings):
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      tree, shardings)


def _state_shardings(abstract, mesh, fsdp: bool):
  """The TrainState shardings `train.train` uses."""
  rep = sharding_lib.replicated(mesh)
  return train_lib.TrainState(
      step=rep,
      params=sharding_lib.state_shardings(abstract.params, mesh, fsdp),
      opt_state=sharding_lib.state_shardings(abstract.opt_state, mesh, fsdp),
      rng=rep,
      ema_params=(None if abstract.ema_params is None else
                  sharding_lib.state_shardings(abstract.ema_params, mesh,
                                               fsdp)))


def _distill_stage(config):
  """Stage k=4 (self-forcing) with the frozen k=2 student as its source."""
  teacher_cfg = model_lib.ModelConfig.from_config(config.model)
  kwargs = dict(window=4, method='self_forcing',
                student_cfg=distill_lib.student_config(teacher_cfg, 4),
                source_cfg=distill_lib.student_config(teacher_cfg, 2),
                num_windows=config.distill.num_windows,
                precision=config.distill.precision,
                # A sampled or median rollout projects through other code
                # than the argmax (full logits): compile the one distill
                # runs.
                readout=config.distill.get('readout', 'argmax'),
                readout_temperature=float(
                    config.distill.get('readout_temperature', 1.0)))
  if 'kernels' in config:  # Configs with projection kernels pick one.
    kwargs['kernel_impl'] = config.kernels.impl
  return distill_lib.Stage(**kwargs)


def compile_step(config, which: str, mesh, *, fsdp: bool,
                 batch_size: int) -> dict:
  """AOT-compiles one step on `mesh`; returns its memory analysis row."""
  if which == TEACHER:
    tc = config.train
    task = teacher_lib.teacher_task(config)
    frozen = None
    # The teacher task's own init: no params are created under eval_shape.
    state_task = task
  elif which == DISTILL:
    if fsdp:  # train() refuses mesh.fsdp with the shard_map step.
      raise ValueError('the distillation step runs with replicated state '
                       '(mesh.fsdp is not supported there): compile it with '
                       'fsdp=False')
    tc = commands.stage_config(config, 4).train  # _distill_stage's.
    stage = _distill_stage(config)
    rng0 = jax.ShapeDtypeStruct((2,), jnp.uint32)
    source = jax.eval_shape(
        lambda r: model_lib.init_params(stage.source_cfg, r), rng0)
    frozen = source
    task = distill_lib.stage_task(stage, init_from=source, frozen=source)
    # transfer_params keeps the fresh student's structure, shapes and dtypes,
    # so the abstract state is that of a fresh student.
    fresh = {'init_params': lambda r: model_lib.init_params(
        stage.student_cfg, r)}
    if hasattr(task, 'init_source'):  # Tasks that take it as an argument.
      fresh['init_source'] = None
    state_task = dataclasses.replace(task, **fresh)
  else:
    raise ValueError(f'unknown step {which!r}; expected {TEACHER!r} or '
                     f'{DISTILL!r}')
  size = mesh.shape[sharding_lib.DATA]
  if batch_size % size:
    raise ValueError(f'global batch {batch_size} is not divisible by the '
                     f'{size} devices')

  optimizer = train_lib.make_optimizer(tc)
  ema = tc.ema_decay > 0
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
  abstract = jax.eval_shape(
      lambda r: train_lib.init_state(state_task, optimizer, r, ema), rng)
  shardings = _state_shardings(abstract, mesh, fsdp)
  batch_sh = sharding_lib.batch_sharding(mesh)
  frozen_sh = jax.tree.map(lambda _: sharding_lib.replicated(mesh), frozen)
  step = jax.jit(
      train_lib.make_step(task, optimizer, tc.ema_decay, mesh),
      in_shardings=(shardings, batch_sh, frozen_sh),
      out_shardings=(shardings, sharding_lib.replicated(mesh)),
      donate_argnums=(0, 1))
  args = (_abstract(abstract, shardings),
          jax.ShapeDtypeStruct((batch_size, config.model.seq_len), jnp.int32,
                               sharding=batch_sh),
          None if frozen is None else _abstract(frozen, frozen_sh))
  t0 = time.time()
  with jax.set_mesh(mesh):
    lowered = step.lower(*args)
  t1 = time.time()
  compiled = lowered.compile()
  t2 = time.time()

  def nbytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

  row = dict(
      config=config.name, step=which, fsdp=fsdp, devices=size,
      platform=mesh.devices.flat[0].platform, global_batch=batch_size,
      per_device_batch=batch_size // size, seq_len=config.model.seq_len,
      num_layers=config.model.num_layers,
      num_windows=(config.distill.num_windows if which == DISTILL else None),
      ema=ema, params=model_lib.count_params(abstract.params),
      state_bytes_global=nbytes(abstract),
      frozen_bytes_global=nbytes(frozen) if frozen is not None else 0,
      lower_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2))
  stats = compiled.memory_analysis()
  for field in _MEMORY_FIELDS:
    row[field] = None if stats is None else int(getattr(stats, field))
  if stats is not None:
    # Donated state is aliased to the output: count it once.
    row['peak_estimate_bytes'] = (
        row['argument_size_in_bytes'] + row['output_size_in_bytes']
        - row['alias_size_in_bytes'] + row['temp_size_in_bytes'])
  return row


def with_device_count(xla_flags: str, devices: int) -> str:
  """`xla_flags` asking for `devices` CPU devices, any other count dropped."""
  flag = '--xla_force_host_platform_device_count'
  kept = [f for f in xla_flags.split() if not f.startswith(flag + '=')]
  return ' '.join(kept + [f'{flag}={devices}'])


def cpu_mesh(devices: int):
  """A 1-D 'data' mesh over the first `devices` (fake) CPU devices."""
  available = jax.devices('cpu')
  if len(available) < devices:
    raise ValueError(
        f'--devices={devices} but JAX has {len(available)} CPU devices; set '
        f'XLA_FLAGS=--xla_force_host_platform_device_count={devices} before '
        'JAX starts (python -m kforcing_jax.aot does)')
  return jax.sharding.Mesh(np.array(available[:devices]),
                           (sharding_lib.DATA,))


def tpu_mesh(topology: str):
  """A mesh of compile-only TPU devices; needs libtpu, not a TPU."""
  desc = topologies.get_topology_desc(topology, 'tpu')
  return jax.sharding.Mesh(np.array(desc.devices), (sharding_lib.DATA,))


def run(config, mesh, *, steps=(TEACHER, DISTILL), batch_size=0,
        distill_batch_size=0, replicated=False) -> list[dict]:
  """Compiles every requested step: the teacher's in the layout training
  uses (mesh.fsdp), and also replicated if asked."""
  batches = {TEACHER: ('batch_size', 'train.batch_size',
                       batch_size or config.train.batch_size),
             DISTILL: ('distill_batch_size', 'distill.batch_size',
                       distill_batch_size or config.distill.batch_size)}
  size = mesh.shape[sharding_lib.DATA]
  for which in steps:  # All of them before the first (minutes-long) compile.
    if which not in batches:
      raise ValueError(f'unknown step {which!r}; expected {TEACHER!r} or '
                       f'{DISTILL!r}')
    flag, field, batch = batches[which]
    if batch % size:
      raise ValueError(f'global batch {batch} (--{flag}, or {field} when 0) '
                       f'is not divisible by the {size} devices')
  rows, header = [], True
  for which in steps:
    batch = batches[which][2]
    # The teacher row uses mesh.fsdp, as train() does; --replicated adds
    # the replicated layout to an FSDP config. Distillation always
    # replicates its state, as training does.
    options = (bool(config.mesh.fsdp),) + (
        (False,) if replicated and config.mesh.fsdp else ())
    for fsdp in ((False,) if which == DISTILL else options):
      try:
        rows.append(compile_step(config, which, mesh, fsdp=fsdp,
                                 batch_size=batch))
      except ValueError:  # A bad request (batch vs devices): exit 2.
        raise
      except Exception as e:  # pylint: disable=broad-except
        # E.g. RESOURCE_EXHAUSTED: the answer to "does it fit?", not a crash.
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        rows.append(dict(config=config.name, step=which, fsdp=fsdp,
                         devices=mesh.shape[sharding_lib.DATA],
                         global_batch=batch,
                         error=f'{type(e).__name__}: {first}'))
        print(f"{config.name} | {which} | {fsdp}: did not compile: "
              f"{rows[-1]['error']}", flush=True)
        continue
      print(format_table(rows[-1:], header=header), flush=True)
      header = False
  return rows


def _mib(x) -> str:
  return '-' if x is None else f'{x / 2**20:,.1f}'


def format_table(rows, header=True) -> str:
  cols = ('config', 'step', 'fsdp', 'devices', 'global_batch',
          'per_device_batch', 'argument', 'output', 'alias', 'temp', 'code',
          'peak_est', 'compile_s')
  lines = []
  if header:
    lines.append(' | '.join(cols) + '   (sizes: MiB per device)')
  for r in rows:
    lines.append(' | '.join(str(v) for v in (
        r['config'], r['step'], r['fsdp'], r['devices'], r['global_batch'],
        r['per_device_batch'], _mib(r['argument_size_in_bytes']),
        _mib(r['output_size_in_bytes']), _mib(r['alias_size_in_bytes']),
        _mib(r['temp_size_in_bytes']),
        _mib(r['generated_code_size_in_bytes']),
        _mib(r.get('peak_estimate_bytes')), r['compile_s'])))
  return '\n'.join(lines)


def _steps_from_flag(names):
  mapping = {'teacher': TEACHER, 'distill': DISTILL}
  if not names:
    raise app.UsageError('--steps is empty; expected teacher, distill or '
                         'both')
  bad = [n for n in names if n not in mapping]
  if bad:
    raise app.UsageError(f'--steps: unknown {bad}; expected teacher, distill')
  # Each once, in the order given: a repeat compiled the same step again.
  return tuple(mapping[n] for n in dict.fromkeys(names))


def _define_flags():
  """Flags of the command line only: importing this module defines none."""
  f = {}
  f['config'] = config_flags.DEFINE_config_file(
      'config', None, 'Experiment config file (configs/*.py).',
      lock_config=True)
  f['devices'] = flags.DEFINE_integer(
      'devices', 8, 'Fake CPU devices to compile for (ignored with '
      '--tpu_topology).')
  f['batch_size'] = flags.DEFINE_integer(
      'batch_size', 0, 'Teacher global batch; 0 = config train.batch_size.')
  f['distill_batch_size'] = flags.DEFINE_integer(
      'distill_batch_size', 0, 'Distillation global batch; 0 = config '
      'distill.batch_size.')
  f['steps'] = flags.DEFINE_list('steps', ['teacher', 'distill'],
                                 'Steps to compile: teacher, distill.')
  f['replicated'] = flags.DEFINE_bool(
      'replicated', False, 'With mesh.fsdp=True, also compile the teacher '
      'step with replicated params/optimizer state, to compare (the teacher '
      'row follows mesh.fsdp, as training does; the distillation step is '
      'always replicated).')
  f['tpu_topology'] = flags.DEFINE_string(
      'tpu_topology', '', "Compile for a TPU slice instead, e.g. 'v5e:2x4' "
      "or 'v4:2x2x1' (needs libtpu).")
  f['out'] = flags.DEFINE_string('out', '', 'Write the results as JSON here.')
  return f


def main(argv, flag_values):
  del argv
  fv = {k: v.value for k, v in flag_values.items()}
  config = fv['config']
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/lm1b.py')
  steps = _steps_from_flag(fv['steps'])
  # Everything a user can get wrong, before the first (minutes-long) compile.
  defaults.validate(config)
  for name in ('batch_size', 'distill_batch_size'):
    if fv[name] < 0:
      raise app.UsageError(f'--{name}={fv[name]} must be >= 0 (0: the '
                           "config's)")
  _check_out(fv['out'])
  result = {'jax': jax.__version__, 'rows': []}
  if fv['tpu_topology']:
    try:
      mesh = tpu_mesh(fv['tpu_topology'])
    except Exception as e:  # pylint: disable=broad-except
      # libtpu missing or an unknown topology: say so, fake nothing.
      msg = f'{type(e).__name__}: {e}'
      print(f"TPU topology {fv['tpu_topology']!r} unavailable: {msg}",
            file=sys.stderr)
      result['tpu_error'] = msg
      _write(result, fv['out'])
      sys.exit(1)
  else:
    mesh = cpu_mesh(fv['devices'])
  result['rows'] = run(config, mesh, steps=steps, batch_size=fv['batch_size'],
                       distill_batch_size=fv['distill_batch_size'],
                       replicated=fv['replicated'])
  # run() already printed each row as it compiled: the table is complete.
  _write(result, fv['out'])
  if any('error' in r for r in result['rows']):
    sys.exit(1)


def _check_out(path: str) -> None:
  """Refuses an --out that could not be written, before any compile."""
  if not path:
    return
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    # The nearest existing ancestor says which: a missing folder, or a
    # file where a folder should be.
    above = folder
    while not os.path.exists(above):
      above = os.path.dirname(above)
    if not os.path.isdir(above):
      raise app.UsageError(f'--out={path}: {above} is a file, not a folder')
    raise app.UsageError(f'--out={path}: folder {folder} does not exist')
  if os.path.isdir(path):
    raise app.UsageError(f'--out={path} is a directory; name a file, e.g. '
                         f'{os.path.join(path, "aot.json")}')
  # The result is written by a rename in that folder: the folder must take
  # a new file (os.access misses read-only mounts for root).
  try:
    files.check_writable(folder, 'aot writes its result there')
  except ValueError as e:
    raise app.UsageError(f'--out={path}: {e}') from e


def _write(result, path):
  if path:
    files.atomic_write_text(path, json.dumps(result, indent=1))


def _prepare_backend(argv):
  """Fake CPU devices must be requested before JAX starts its backends."""
  devices, topology = '8', ''
  for i, arg in enumerate(argv):
    following = argv[i + 1] if i + 1 < len(argv) else ''
    if arg.startswith('--devices='):
      devices = arg.split('=', 1)[1]
    elif arg == '--devices':
      devices = following
    if arg.startswith('--tpu_topology='):
      topology = arg.split('=', 1)[1]
    elif arg == '--tpu_topology':
      topology = following
  if not topology and (not devices.isdigit() or int(devices) < 1):
    print(f'error: --devices={devices!r}: expected a positive integer',
          file=sys.stderr)
    sys.exit(2)
  if topology:  # --devices is ignored, as --help says.
    # Compile-only: don't ask a GCE metadata server about a TPU VM.
    os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
    return
  # --devices wins over an inherited device count (cpu_mesh's error
  # message says this module sets it).
  os.environ['XLA_FLAGS'] = with_device_count(
      os.environ.get('XLA_FLAGS', ''), int(devices))
  # Compile for the CPU even on an accelerator host (jax is imported, but
  # its backends start only at the first device query).
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if not platforms:
    jax.config.update('jax_platforms', 'cpu')
  elif 'cpu' not in platforms.split(','):
    print(f'error: JAX_PLATFORMS={platforms!r} leaves out cpu, and without '
          '--tpu_topology aot compiles for CPU devices: unset JAX_PLATFORMS '
          'or add cpu to it', file=sys.stderr)
    sys.exit(2)


def _cli(argv, flag_values):
  """Parses the flags (a bad config file or a misspelled --config.x.y
  override is one line, as in the main CLI, not absl's traceback), then
  runs main."""
  app.define_help_flags()  # --help / --helpfull, as app.run defines them.
  error = None
  try:
    rest = config_files.parse_flags(flags.FLAGS, argv)
  except (config_files.FlagsError, flags.Error) as e:
    error = str(e)
  if error is None:
    try:
      return main(rest, flag_values)
    except (app.UsageError, ValueError) as e:
      error = str(e)
    except (AssertionError, RuntimeError) as e:
      error = sharding_lib.backend_failure(e)
      if error is None:
        raise
  print(f'error: {error}', file=sys.stderr)
  sys.exit(2)


if __name__ == '__main__':
  _prepare_backend(sys.argv)
  _cli(sys.argv, _define_flags())
