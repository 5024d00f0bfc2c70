"""The models and prompts `bench` times: trained runs, else random weights."""

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from kforcing_jax import bench_settings
from kforcing_jax import checkpoints
from kforcing_jax import model as model_lib


@dataclasses.dataclass
class BenchModel:
  name: str  # Run directory name, or 'random_teacher' / 'random_student'.
  weights: str  # 'trained' or 'random'.
  cfg: model_lib.ModelConfig
  params: Any
  serves_k: list[int] = dataclasses.field(default_factory=list)


def _has_run(workdir: str, name: str) -> bool:
  manager = checkpoints.Manager(os.path.join(workdir, name))
  return manager.latest_step() is not None


def load_models(config, workdir: str,
                s: bench_settings.BenchSettings) -> dict[int, BenchModel]:
  """{k: model} for k = 1 and every k in s.ks.

  k=1 is the teacher run; k>1 the smallest trained window >= k. Whatever
  is missing (or everything, with random_weights) gets random weights of
  the same backbone: the trained teacher's shape if there is one, else a
  trained student's, else config.model.
  """
  loaded: dict[str, BenchModel] = {}
  base_cfg = None

  def trained(name):
    if name not in loaded:
      cfg, params, _ = checkpoints.load_params(os.path.join(workdir, name))
      loaded[name] = BenchModel(name, 'trained', cfg, params)
    return loaded[name]

  models: dict[int, BenchModel] = {}
  if not s.random_weights and _has_run(workdir, 'teacher'):
    models[1] = trained('teacher')
    base_cfg = models[1].cfg
  windows = [] if s.random_weights else [
      w for w in checkpoints.trained_windows(workdir)
      if _has_run(workdir, f'student_k{w}')]
  for k in s.ks:
    fits = [w for w in windows if w >= k]
    if fits:
      models[k] = trained(f'student_k{fits[0]}')
      base_cfg = base_cfg or dataclasses.replace(models[k].cfg,
                                                 noise_window=0)
  missing = [k for k in [1, *s.ks] if k not in models]
  if missing:
    base_cfg = base_cfg or model_lib.ModelConfig.from_config(config.model)
    window = max([*s.ks, 1])
    student_cfg = dataclasses.replace(base_cfg, noise_window=window)
    # Jitted: eager init dispatches (and compiles) op by op, ~3x slower.
    params = jax.jit(model_lib.init_params, static_argnums=0)(
        student_cfg, jax.random.PRNGKey(s.seed))
    # The random teacher is the same backbone without the noise encoder.
    random_teacher = BenchModel(
        'random_teacher', 'random', dataclasses.replace(base_cfg,
                                                        noise_window=0),
        {n: v for n, v in params.items() if n != 'noise_encoder'})
    random_student = BenchModel('random_student', 'random', student_cfg,
                                params)
    for k in missing:
      models[k] = random_teacher if k == 1 else random_student
  for k, m in sorted(models.items()):
    m.serves_k.append(k)
  return models


def make_prompts(config, workdir: str, s: bench_settings.BenchSettings,
                 batch: int, vocab_size: int) -> np.ndarray:
  """(batch, prefix_len) int32 prompts: random ids or held-out prefixes."""
  if s.prompts == 'heldout':
    from kforcing_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    tokenizer = data_lib.get_tokenizer(
        config, workdir,
        splits=[('data.eval_split', config.data.eval_split)])
    rows = data_lib.make_eval_batches(config, tokenizer, workdir,
                                      batch_size=1, num_batches=batch)
    prefixes = np.concatenate(rows)[:, :s.prefix_len]
    # A short split repeats its prefixes; speed does not depend on them.
    return np.resize(prefixes, (batch, s.prefix_len)).astype(np.int32)
  rng = np.random.default_rng(s.seed)
  # Id 0 is often padding; real prompts avoid it.
  return rng.integers(1, vocab_size, (batch, s.prefix_len), dtype=np.int32)
