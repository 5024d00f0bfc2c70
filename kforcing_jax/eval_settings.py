"""The `eval` config section: `EvalSettings`, read and checked up front, and
`check_evaluator_dir`, the first check of `eval.evaluator` (a folder with a
config.json), without transformers; `hf_evaluator.check_evaluator`, which
pipeline runs before training, adds the rest."""

import dataclasses
import math
import os

from kforcing_jax import decode
from kforcing_jax import decode_checks

# Defaults of the `eval` config section, used for fields a config lacks.
_DEFAULTS = {
    'num_samples': 256,
    'prefix_len': 6,
    'batch_size': 32,
    'seed': 0,
    'ks': (),
    'penalties': {'k2': 0.2, 'k3': 0.4, 'k4': 0.5},
    'evaluator': '',
    'evaluator_batch_size': 8,
    'bootstrap': 1000,
    'ci_level': 0.95,
    'split': '',
    'sweep_contexts': 32,
    'sweep_grid': 1024,
    'sample_temperature': 0.0,
    'median_temperature': 0.0,
}


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """The `eval` config section, with defaults filled in and checked."""
  num_samples: int
  prefix_len: int
  batch_size: int
  seed: int
  ks: tuple[int, ...]  # Empty: 1..largest trained window.
  penalties: tuple[tuple[int, float], ...]  # (k, lambda) pairs.
  evaluator: str
  evaluator_batch_size: int
  bootstrap: int
  ci_level: float
  split: str  # '' means data.eval_split.
  sweep_contexts: int  # Held-out contexts of the noise sweep; 0: none.
  sweep_grid: int  # u grid points per swept context.
  # > 0: every student row is also decoded with readout 'sample' at this
  # temperature (decode.DecodeSpec.readout); 0: none.
  sample_temperature: float = 0.0
  median_temperature: float = 0.0  # Likewise with readout 'median'.

  def penalty(self, k: int) -> float:
    return dict(self.penalties).get(k, 0.0)


def _parse_penalties(raw, most: float = math.inf
                     ) -> tuple[tuple[int, float], ...]:
  """Parses {k: lambda}; keys 'k2' (CLI-overridable), '2' or 2; each
  lambda in [0, most]."""
  items = raw.items() if hasattr(raw, 'items') else raw
  out = []
  for key, lam in items:
    try:
      k = int(key[1:] if isinstance(key, str) and key[:1] == 'k' else key)
    except (TypeError, ValueError) as e:
      raise ValueError(f"eval.penalties key {key!r} is not a k (e.g. 'k2')"
                       ) from e
    if k < 1 or not 0 <= float(lam) < math.inf:
      raise ValueError(f'eval.penalties[{key!r}]={lam}: need k >= 1 and '
                       'a finite lambda >= 0')
    if float(lam) > most:
      raise ValueError(f'eval.penalties[{key!r}]={lam}: at most {most:.3g}, '
                       'so that lambda times a count of up to model.seq_len '
                       'stays finite in float32')
    out.append((k, float(lam)))
  return tuple(sorted(out))


def _max_penalty(config) -> float:
  seq_len = (config.get('model', None) or {}).get('seq_len', None)
  if not seq_len:
    return math.inf
  return decode.max_frequency_penalty(int(seq_len))


def settings_from_config(config) -> EvalSettings:
  """Reads `config.eval` (missing fields take defaults); raises ValueError."""
  section = config.get('eval', None) or {}
  raw = {name: section.get(name, default)
         for name, default in _DEFAULTS.items()}
  s = EvalSettings(
      num_samples=int(raw['num_samples']), prefix_len=int(raw['prefix_len']),
      batch_size=int(raw['batch_size']), seed=int(raw['seed']),
      ks=tuple(int(k) for k in raw['ks']),
      penalties=_parse_penalties(raw['penalties'], _max_penalty(config)),
      evaluator=str(raw['evaluator']),
      evaluator_batch_size=int(raw['evaluator_batch_size']),
      bootstrap=int(raw['bootstrap']), ci_level=float(raw['ci_level']),
      split=str(raw['split']), sweep_contexts=int(raw['sweep_contexts']),
      sweep_grid=int(raw['sweep_grid']),
      sample_temperature=float(raw['sample_temperature']),
      median_temperature=float(raw['median_temperature']))
  for name in ('num_samples', 'prefix_len', 'batch_size',
               'evaluator_batch_size', 'sweep_grid'):
    if getattr(s, name) < 1:
      raise ValueError(f'eval.{name}={getattr(s, name)} must be >= 1')
  if s.bootstrap < 0:
    raise ValueError(f'eval.bootstrap={s.bootstrap} must be >= 0')
  if s.sweep_contexts < 0:
    raise ValueError(f'eval.sweep_contexts={s.sweep_contexts} must be >= 0 '
                     '(0 skips the noise sweep)')
  if not 0 < s.ci_level < 1:
    raise ValueError(f'eval.ci_level={s.ci_level} not in (0, 1)')
  decode_checks.check_config_temperature(
      'eval.sample_temperature', s.sample_temperature,
      zero_means='no sampled-readout rows')
  decode_checks.check_config_temperature(
      'eval.median_temperature', s.median_temperature,
      zero_means='no median-readout rows')
  if any(k < 1 for k in s.ks):
    raise ValueError(f'eval.ks={s.ks}: every k must be >= 1')
  if len(set(s.ks)) != len(s.ks):
    raise ValueError(f'eval.ks={s.ks}: each k once')
  return s


def check_evaluator_dir(path: str) -> None:
  """A local `save_pretrained` folder: a directory with a config.json."""
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f'eval.evaluator={path!r} is not a directory; point it at a local '
        'save_pretrained folder (model + tokenizer)')
  if not os.path.isfile(os.path.join(path, 'config.json')):
    raise ValueError(
        f'eval.evaluator={path!r} has no config.json, so it is not a '
        'Hugging Face save_pretrained folder (model + tokenizer)')
