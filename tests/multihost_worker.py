"""One process of a (possibly multi-process) teacher + distillation run.

Used by tests/test_multihost.py: started once per process with the
KFORCING_* distributed variables (or none, for the single-process
reference). It trains the teacher and the distillation chain of the tiny
config through `commands.run_teacher` / `commands.run_distill`, the code the
CLI runs, then process 0 writes the final parameters of every run to --out.

  python tests/multihost_worker.py WORKDIR OUT.npz OVERRIDES [TEACHER_OVERRIDES]

OVERRIDES (JSON, dotted config fields) apply to both commands; the optional
TEACHER_OVERRIDES only to the teacher (e.g. '{"mesh.fsdp": true}': the
distillation step refuses FSDP).
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from kforcing_jax import sharding

# Before anything touches a JAX backend; the second call is a no-op.
_DISTRIBUTED = sharding.maybe_initialize_distributed()
assert sharding.maybe_initialize_distributed() == _DISTRIBUTED

import importlib.util

import jax
import numpy as np

from kforcing_jax import commands
from kforcing_jax import defaults
# pylint: enable=g-import-not-at-top,wrong-import-position


def tiny_config(overrides: dict):
  spec = importlib.util.spec_from_file_location(
      'tiny_config', os.path.join(ROOT, 'configs', 'tiny.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split('.')
    for part in parents:
      node = node[part]
    node[leaf] = tuple(value) if isinstance(value, list) else value
  defaults.validate(config)
  return config


def flat_params(prefix: str, params) -> dict[str, np.ndarray]:
  host = sharding.to_host(params)  # Collective: every process calls it.
  return {prefix + jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(host)}


def main(argv):
  workdir, out, overrides = argv[1], argv[2], json.loads(argv[3])
  teacher_overrides = json.loads(argv[4]) if len(argv) > 4 else {}
  config = tiny_config(overrides)
  teacher = commands.run_teacher(
      tiny_config(dict(overrides, **teacher_overrides)), workdir)
  if teacher.preempted:  # Signalled: report where it stopped, go no further.
    print(f'process {jax.process_index()} stopped at step '
          f'{int(teacher.state.step)}', flush=True)
    return
  arrays = flat_params('teacher', teacher.state.params)
  for result in commands.run_distill(config, workdir):
    arrays.update(flat_params(os.path.basename(result.run_dir),
                              result.state.params))
  if jax.process_index() == 0:
    np.savez(out, **arrays)
  print(f'process {jax.process_index()}/{jax.process_count()} done, '
        f'{jax.device_count()} devices', flush=True)


if __name__ == '__main__':
  main(sys.argv)
