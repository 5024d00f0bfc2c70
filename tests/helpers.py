"""Small shared pieces for tests."""

import os

import numpy as np

from kforcing_jax import aot


def xla_flags(devices: int = 1) -> str:
  """This run's XLA_FLAGS (conftest's, e.g. LLVM at -O0) for a subprocess
  with `devices` CPU devices; one undoes the suite's 8 fake devices."""
  return aot.with_device_count(os.environ.get('XLA_FLAGS', ''), devices)


class ArrayIterator:
  """Deterministic batch iterator over a fixed array, with resumable state."""

  def __init__(self, data: np.ndarray, batch_size: int):
    self.data, self.batch_size, self.pos = data, batch_size, 0

  def __iter__(self):
    return self

  def __next__(self):
    idx = (self.pos + np.arange(self.batch_size)) % len(self.data)
    self.pos += self.batch_size
    return self.data[idx]

  def get_state(self):
    return {'pos': self.pos}

  def set_state(self, state):
    self.pos = state['pos']


def max_abs_diff(a, b) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  diffs = jax.tree.map(lambda x, y: float(np.abs(np.asarray(x, np.float64)
                                                 - np.asarray(y)).max()),
                       a, b)
  return max(jax.tree.leaves(diffs))


def sgd_update(task, mesh_config, batch, frozen):
  """(params delta, metrics) of one `train.make_step` step with SGD(lr=1)
  on a mesh from `mesh_config` (params split over it under fsdp): the
  delta is minus the gradient, which no Adam rescaling can hide (e.g. a
  sum where a mean belongs)."""
  # pylint: disable=g-import-not-at-top
  import jax
  import optax
  from kforcing_jax import sharding
  from kforcing_jax import train as train_lib
  mesh = sharding.make_mesh(mesh_config)
  opt = optax.sgd(1.0)
  state = train_lib.init_state(task, opt, jax.random.PRNGKey(0), ema=False)
  # Placed as `train` places them: split over the mesh under fsdp.
  state = state.replace(**{
      name: jax.device_put(tree, sharding.state_shardings(
          tree, mesh, mesh_config.fsdp))
      for name, tree in (('params', state.params),
                         ('opt_state', state.opt_state))})
  step = jax.jit(train_lib.make_step(task, opt, 0.0, mesh))
  with jax.set_mesh(mesh):
    new, metrics = step(state, sharding.global_batch(np.asarray(batch), mesh),
                        frozen)
  return jax.tree.map(lambda a, b: a - b, new.params, state.params), metrics


def stat(mean=1.0):
  """An eval.json STAT with mean = lo = hi."""
  return {'mean': mean, 'lo': mean, 'hi': mean, 'n': 2}


def _eval_entry(kind, k=1):
  from kforcing_jax import eval_schema  # pylint: disable=g-import-not-at-top
  metrics = {key: stat() for key in eval_schema.METRIC_KEYS}
  metrics['evaluator_ppl'] = None
  coupling = None
  if kind == 'student':
    coupling = {'agreement': stat(), 'per_slot': [stat()] * k,
                'first_divergence': stat(), 'forced_agreement': stat(),
                'forced_per_slot': [stat()] * k}
  return {'kind': kind, 'run': kind, 'k': k, 'penalty': 0.0,
          'samples_file': f'samples/{kind}.jsonl',
          'decode': {'seconds': 1.0, 'tokens_per_s': 2.0,
                     'includes_compile': True},
          'metrics': metrics, 'coupling': coupling}


def minimal_eval_json():
  """The smallest eval.json the schema accepts: a teacher and a k=2 student."""
  from kforcing_jax import eval_schema  # pylint: disable=g-import-not-at-top
  settings = {key: (0.95 if typ is float else '' if typ is str else 1)
              for key, typ in eval_schema.SETTINGS_TYPES.items()}
  # The student with the optional readout keys, the teacher without (as
  # files from before them).
  student = _eval_entry('student', 2) | {'readout': 'argmax',
                                         'temperature': 1.0}
  return {'schema_version': eval_schema.SCHEMA_VERSION, 'name': 'x',
          'settings': settings, 'notes': [],
          'models': {'teacher': _eval_entry('teacher'),
                     'student_k2': student}}


def decode_variants(small_cfg, k, variants, seed):
  """[(spec, decode_loop output)] of one model, prompts and noise, for each
  dict of DecodeSpec overrides in `variants` (a student when k > 1)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from kforcing_jax import decode  # pylint: disable=g-import-not-at-top
  from kforcing_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  cfg = dataclasses.replace(small_cfg, noise_window=4 if k > 1 else 0)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(seed))
  prompts, pad = decode.pad_prompts([[5, 9, 2, 33, 7], [1, 2]])
  steps = 24 // k
  noise = jax.random.uniform(jax.random.PRNGKey(seed + 1), (2, steps * k))
  outs = []
  for overrides in variants:
    spec = decode.DecodeSpec(model=cfg, k=k, num_steps=steps,
                             prompt_len=prompts.shape[1], use_penalty=True,
                             **overrides)
    outs.append((spec, decode.decode_loop(
        spec, params, jnp.asarray(prompts), jnp.asarray(pad), noise,
        jnp.float32(1.0), jnp.float32(0.3))))
  return outs


def read_only(monkeypatch, folder):
  """Makes creating a file directly in `folder` fail as on a read-only
  mount (chmod does not stop root, which the tests may run as)."""
  # pylint: disable=g-import-not-at-top
  import errno
  import tempfile
  real = tempfile.mkstemp
  folder = os.path.abspath(folder)

  def mkstemp(*args, dir=None, **kwargs):  # pylint: disable=redefined-builtin
    if dir is not None and os.path.abspath(dir) == folder:
      raise OSError(errno.EROFS, 'Read-only file system')
    return real(*args, dir=dir, **kwargs)

  monkeypatch.setattr(tempfile, 'mkstemp', mkstemp)


def must_not_run(*args, **kwargs):
  raise AssertionError('ran, but the input should have been refused first')
