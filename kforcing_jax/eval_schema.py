"""The eval.json schema and its check, and the samples files' format.

eval.json, as `evaluate.run_evaluate` writes it (`validate_eval_json`
checks it):
  {
    "schema_version": 1,
    "name": str,                       # config.name
    "settings": {"prefix_len": int, "max_new_tokens": int, "seq_len": int,
                 "num_samples": int, "batch_size": int, "seed": int,
                 "bootstrap": int, "ci_level": float, "split": str,
                 "evaluator": str, "evaluator_scope": "continuation"},
    "notes": [str, ...],
    "checkpoints": {RUN: {"step": int, "run_id": str}},  # optional key:
                                       # every run in the workdir then, at
                                       # its latest checkpoint (run_id
                                       # optional: older runs have none)
    "models": {
      NAME: {
        "kind": "data" | "teacher" | "student",
        "run": str | null,             # run directory name, e.g. student_k4
        "k": int, "penalty": float,
        "readout": "argmax" | "sample" | "median",  # students only,
        "temperature": float,  # optional (not in older files: argmax);
                               # a sampled or median readout's temperature
        "samples_file": str,           # relative: samples/NAME.jsonl
        "decode": null | {"seconds": float, "tokens_per_s": float,
                          "includes_compile": bool},
        "metrics": {"teacher_ppl": STAT, "evaluator_ppl": STAT | null,
                    "entropy": STAT, "distinct_1": STAT, ..., "distinct_4":
                    STAT, "repetition_4": STAT},
        "coupling": null | {"agreement": STAT, "per_slot": [STAT] * k,
                            "first_divergence": STAT,
                            "forced_agreement": STAT,  # these two optional
                            "forced_per_slot": [STAT] * k,
                            "noise_sweep": null | SWEEP}  # optional key
      }, ...
    }
  }
  STAT = {"mean": float | null, "lo": float | null, "hi": float | null,
          "n": int}   # n samples contributing; null values when n == 0.
  SWEEP = noise_sweep.py's JSON form (STATs over contexts, not samples).

Each samples/NAME.jsonl line: {"index", "model", "k", "penalty", "readout"
and "temperature" (students only), "prefix"
(text), "text" (prefix + continuation, decoded together by the data
tokenizer, which drops eos: the evaluator scores the same ids with each eos
written as its own eos token), "prefix_ids",
"token_ids" (generated ids), "teacher_nll" (mean per token), "evaluator_nll"
(mean per token or null), "evaluator_tokens" (how many evaluator tokens that
mean is over, or null: evaluator_ppl is exp of sum(evaluator_nll *
evaluator_tokens) / sum(evaluator_tokens) over a model's file, skipping
rows whose evaluator_nll is null), "entropy"}.
"""

import math

from kforcing_jax import checkpoints
from kforcing_jax import decode_spec
from kforcing_jax import eval_metrics
from kforcing_jax import noise_sweep

SCHEMA_VERSION = 1

SETTINGS_TYPES = {
    'prefix_len': int, 'max_new_tokens': int, 'seq_len': int,
    'num_samples': int, 'batch_size': int, 'seed': int, 'bootstrap': int,
    'ci_level': float, 'split': str, 'evaluator': str, 'evaluator_scope': str,
}
METRIC_KEYS = (('teacher_ppl', 'evaluator_ppl', 'entropy') +
                tuple(f'distinct_{n}' for n in eval_metrics.NGRAM_ORDERS) +
                (f'repetition_{eval_metrics.REPETITION_N}',))


def _need(d, key, types, where):
  """d[key], checked to be one of `types`; ValueError names the key."""
  path = f'{where}.{key}' if where else key
  if not isinstance(d, dict) or key not in d:
    raise ValueError(f'eval.json: missing key {path!r}')
  value = d[key]
  types = types if isinstance(types, tuple) else (types,)
  # bool is an int subclass; never accept it where a number is meant.
  if not isinstance(value, types) or (
      isinstance(value, bool) and bool not in types):
    raise ValueError(f'eval.json: {path!r} is {type(value).__name__}, '
                     f'expected {"/".join(t.__name__ for t in types)}')
  return value


def _check_stat(stat, where: str):
  if not isinstance(stat, dict):
    raise ValueError(f'eval.json: {where!r} must be a stat object')
  n = _need(stat, 'n', int, where)
  if n < 0:
    raise ValueError(f'eval.json: {where!r} has n={n} < 0')
  vals = [_need(stat, key, (float, int, type(None)), where)
          for key in ('mean', 'lo', 'hi')]
  if (n == 0) != all(v is None for v in vals) or (
      n > 0 and any(v is None or not math.isfinite(v) for v in vals)):
    raise ValueError(f'eval.json: {where!r} has n={n} but mean/lo/hi='
                     f'{vals}; need finite numbers iff n > 0')
  if n > 0 and vals[1] > vals[2]:
    raise ValueError(f'eval.json: {where!r} has lo > hi')


def _check_slots(coupling, key: str, k: int, where: str):
  """coupling[key] must be k STATs, one per slot."""
  slots = _need(coupling, key, list, where)
  if len(slots) != k:
    raise ValueError(f'eval.json: {where}.{key} has {len(slots)} entries, '
                     f'expected k={k}')
  for i, stat in enumerate(slots):
    _check_stat(stat, f'{where}.{key}[{i}]')


def _check_model(entry, where: str):
  kind = _need(entry, 'kind', str, where)
  if kind not in ('data', 'teacher', 'student'):
    raise ValueError(f'eval.json: {where}.kind={kind!r} unknown')
  _need(entry, 'run', (str, type(None)), where)
  k = _need(entry, 'k', int, where)
  _need(entry, 'penalty', (float, int), where)
  if 'readout' in entry or 'temperature' in entry:  # Not in older files.
    if kind != 'student':
      raise ValueError(f'eval.json: {where} is a {kind} row: readout and '
                       'temperature are for students only')
    readout = _need(entry, 'readout', str, where)
    if readout not in decode_spec.READOUTS:
      raise ValueError(f'eval.json: {where}.readout={readout!r} unknown')
    temperature = _need(entry, 'temperature', (float, int), where)
    if not 0 < temperature < math.inf:
      raise ValueError(f'eval.json: {where}.temperature={temperature} must '
                       'be finite and > 0')
    if readout == 'argmax' and temperature != 1:
      raise ValueError(f'eval.json: {where}.temperature={temperature} with '
                       "readout 'argmax', which has none (1)")
  _need(entry, 'samples_file', str, where)
  dec = _need(entry, 'decode', (dict, type(None)), where)
  if dec is not None:
    _need(dec, 'seconds', (float, int), f'{where}.decode')
    _need(dec, 'tokens_per_s', (float, int), f'{where}.decode')
    _need(dec, 'includes_compile', bool, f'{where}.decode')
  metrics = _need(entry, 'metrics', dict, where)
  for key in METRIC_KEYS:
    stat = _need(metrics, key, (dict, type(None)), f'{where}.metrics')
    if stat is None and key != 'evaluator_ppl':
      raise ValueError(f'eval.json: {where}.metrics.{key} is null')
    if stat is not None:
      _check_stat(stat, f'{where}.metrics.{key}')
  coupling = _need(entry, 'coupling', (dict, type(None)), where)
  if (coupling is None) != (kind != 'student'):
    raise ValueError(f'eval.json: {where}.coupling must be an object for '
                     'students and null otherwise')
  if coupling is not None:
    cw = f'{where}.coupling'
    _check_stat(_need(coupling, 'agreement', dict, cw), f'{cw}.agreement')
    _check_stat(_need(coupling, 'first_divergence', dict, cw),
                f'{cw}.first_divergence')
    _check_slots(coupling, 'per_slot', k, cw)
    # Absent in eval.json files from before the teacher-forced coupling.
    if ('forced_agreement' in coupling) != ('forced_per_slot' in coupling):
      raise ValueError(f'eval.json: {cw} has one of forced_agreement and '
                       'forced_per_slot without the other')
    if 'forced_agreement' in coupling:
      _check_stat(_need(coupling, 'forced_agreement', dict, cw),
                  f'{cw}.forced_agreement')
      _check_slots(coupling, 'forced_per_slot', k, cw)
    sweep = coupling.get('noise_sweep')  # Absent in older eval.json files.
    if sweep is not None:
      noise_sweep.validate(sweep, f'{cw}.noise_sweep', _check_stat)


def validate_eval_json(d) -> None:
  """Checks `d` against the schema above; raises ValueError."""
  if not isinstance(d, dict):
    raise ValueError('eval.json: top level must be an object')
  version = _need(d, 'schema_version', int, '')
  if version != SCHEMA_VERSION:
    raise ValueError(f'eval.json: schema_version={version}, expected '
                     f'{SCHEMA_VERSION}')
  _need(d, 'name', str, '')
  settings = _need(d, 'settings', dict, '')
  for key, typ in SETTINGS_TYPES.items():
    _need(settings, key, (typ, int) if typ is float else typ, 'settings')
  notes = _need(d, 'notes', list, '')
  if not all(isinstance(x, str) for x in notes):
    raise ValueError("eval.json: 'notes' must hold strings")
  if 'checkpoints' in d:  # Absent in eval.json files from before it.
    checkpoints.check_records(d['checkpoints'], 'eval.json')
  models = _need(d, 'models', dict, '')
  if 'teacher' not in models:
    raise ValueError("eval.json: missing key 'models.teacher'")
  for name, entry in models.items():
    _check_model(entry, f'models.{name}')
