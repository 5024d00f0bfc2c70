"""W/report.md: the tables of a pipeline run, from the files it wrote.

Everything here is read back from disk (metrics.jsonl of each run,
eval.json, bench.json, pipeline.json), so the report can be rebuilt at any
time and every number in it points at the file it came from.
"""

import json
import os

from kforcing_jax import bench_report
from kforcing_jax import files
from kforcing_jax import sharding


def _read_jsonl(path):
  """The records of a metrics.jsonl. A last line cut off by a kill is
  left out, as the training loop trims it when the run resumes."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  records = []
  for i, line in enumerate(lines, start=1):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) and not line.endswith('\n'):
        break
      raise ValueError(f'{path} line {i} is not JSON ({e})') from e
  return records


def _read_json(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:  # Named: the bare error said no file.
      raise ValueError(f'{path} is not valid JSON ({e}); delete it and re-run '
                       'the command that writes it') from e


def _last_records(run_dir):
  """(last metrics record, last one with held-out evals), None if none."""
  records = _read_jsonl(os.path.join(run_dir, 'metrics.jsonl'))
  evals = [r for r in records if any(k.startswith('eval_') for k in r)]
  return (records[-1] if records else None), (evals[-1] if evals else None)


def _stat(s, digits=1):
  if not s or s.get('mean') is None:
    return 'n/a'
  return (f"{s['mean']:.{digits}f} [{s['lo']:.{digits}f}, "
          f"{s['hi']:.{digits}f}]")


def _run_order(run: str):
  """The teacher, then students by window (k2 before k16)."""
  window = run[len('student_k'):]
  return (run != 'teacher', int(window) if window.isdigit() else 1 << 30, run)


def training_section(workdir):
  # Seconds come from pipeline.json: training time under `pipeline` only
  # (a segment run by train-teacher or distill alone is not in it).
  lines = ['## Training', '',
           '| run | steps | eval | seconds (pipeline) |', '|---|---|---|---|']
  timing = (_read_json(os.path.join(workdir, 'pipeline.json')) or {}).get(
      'runs', {})
  runs = sorted((d for d in os.listdir(workdir)
                 if d == 'teacher' or d.startswith('student_k')),
                key=_run_order)
  for run in runs:
    last, ev = _last_records(os.path.join(workdir, run))
    if last is None:
      continue
    # A run without held-out evals (eval_every=0) is listed all the same.
    shown = 'none' if ev is None else ', '.join(
        f'{k[5:]}={v:.4g}' for k, v in sorted(ev.items())
        if k.startswith('eval_'))
    if ev is not None and ev['step'] != last['step']:
      shown += f" (at step {ev['step']})"
    secs = timing.get(run, {}).get('seconds')
    lines.append(f"| {run} | {last['step']} | {shown} | "
                 f"{'' if secs is None else f'{secs:.0f}'} |")
  return lines


def _stale_lines(workdir, name):
  """A warning when `name` predates a run's latest checkpoint: the section
  then describes older models than the training table above."""
  from kforcing_jax import checkpoints  # pylint: disable=g-import-not-at-top
  newer = checkpoints.runs_newer_than(workdir, name)
  if not newer:
    return []
  return [f"**Stale:** {name} predates the latest checkpoint of "
          f"{', '.join(newer)}: this section describes older models (or "
          f"lacks them); delete {name} and re-run to redo it.", '']


def _evaluator_lines(path):
  """Where the evaluator ppl column comes from (train_info.json if ours)."""
  if not path:
    return []
  info = _read_json(os.path.join(path, 'train_info.json'))
  if info is None:
    return [f'Evaluator: `{path}`.', '']
  # Lazily: the report needs no data or torch code otherwise.
  # pylint: disable=g-import-not-at-top
  from kforcing_jax import evaluator_train
  warning = evaluator_train.overfit_warning(info)
  return [f"Evaluator: `{path}`, trained by train-evaluator on the train split "
          f"({info['params'] / 1e6:.2f}M parameters, {info['steps']} steps, "
          f"held-out ppl {info['heldout_ppl']:.1f}): independent in "
          'architecture, tokenizer, framework and seed, not in data.', '',
          *([f'**{warning}**', ''] if warning else [])]


def _ci_label(settings) -> str:
  if not settings['bootstrap']:
    return 'mean [no CI: eval.bootstrap=0, both bounds are the mean]'
  if settings['num_samples'] < 2:  # Nothing to resample.
    return 'mean [no CI: one sample, both bounds are the mean]'
  return (f"mean [{100 * settings['ci_level']:g}% bootstrap CI, "
          f"{settings['bootstrap']} resamples]")


def quality_section(workdir):
  ev = _read_json(os.path.join(workdir, 'eval.json'))
  if ev is None:
    return []
  s = ev['settings']
  lines = ['## Quality (eval.json)', '', *_stale_lines(workdir, 'eval.json'),
           f"{s['num_samples']} samples, {s['prefix_len']}-token held-out "
           f"prefixes completed to {s['seq_len']} tokens, one shared noise "
           f"array (seed {s['seed']}); {_ci_label(s)}.", '',
           *_evaluator_lines(s.get('evaluator', '')),
           '| model | k | penalty | readout | gen. ppl (teacher) | gen. ppl '
           '(evaluator) | entropy | distinct-4 | rep-4 | agreement with '
           'teacher | agreement per slot | teacher-forced per slot |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for name, m in ev['models'].items():
    x = m['metrics']
    coupling = m.get('coupling') or {}
    lines.append(
        f"| {name} | {m['k']} | {m['penalty']:g} | {_readout(m)} | "
        f"{_stat(x['teacher_ppl'])} | {_stat(x.get('evaluator_ppl'))} | "
        f"{_stat(x['entropy'], 3)} | {_stat(x['distinct_4'], 3)} | "
        f"{_stat(x['repetition_4'], 3)} | "
        f"{_stat(coupling.get('agreement'), 3)} | "
        f"{_per_slot(coupling.get('per_slot'))} | "
        f"{_per_slot(coupling.get('forced_per_slot'))} |")
  lines += _sweep_lines(ev['models'])
  lines += [''] + [f'- {n}' for n in ev.get('notes', [])]
  return lines


def _readout(model) -> str:
  """A student's readout ('argmax', or 'sample' / 'median' with its
  temperature); '-' for the teacher and the data."""
  if model['kind'] != 'student':
    return '-'
  readout = model.get('readout', 'argmax')
  if readout == 'argmax':
    return 'argmax'
  return f"{readout}, T={model['temperature']:g}"


def _per_slot(stats) -> str:
  """Slot means s = 1..k (positions n with n % k == s - 1), 'n/a' if none."""
  if not stats:
    return 'n/a'
  return ' / '.join('n/a' if x.get('mean') is None else f"{x['mean']:.3f}"
                    for x in stats)


def _sweep_lines(models):
  """Noise-sweep table (noise_sweep.py) of the rows that have one."""
  rows = [(name, m['coupling']['noise_sweep']) for name, m in models.items()
          if (m.get('coupling') or {}).get('noise_sweep')]
  if not rows:
    return []
  first = rows[0][1]
  lines = ['', f"Noise sweep: slot 1's map against the teacher's at "
           f"{first['contexts']} held-out contexts, u on a {first['grid']}"
           '-point grid (per-context means):', '',
           '| model | slot-1 accuracy | distinct tokens (student / teacher) '
           '| entropy, nats (student / teacher) |', '|---|---|---|---|']
  for name, sw in rows:
    lines.append(
        f"| {name} | {_stat(sw['accuracy'], 3)} | "
        f"{_stat(sw['distinct_student'])} / {_stat(sw['distinct_teacher'])} "
        f"| {_stat(sw['entropy_student'], 2)} / "
        f"{_stat(sw['entropy_teacher'], 2)} |")
  return lines


def speed_section(workdir):
  b = _read_json(os.path.join(workdir, 'bench.json'))
  if b is None:
    return []
  m = b['machine']
  return ['## Decoding speed (bench.json)', '',
          *_stale_lines(workdir, 'bench.json'),
          f"Machine: {m.get('cpu_model')} x{m.get('cpu_count')}, "
          f"{m.get('backend')} ({m.get('device_kind')}), jax "
          f"{m.get('jax_version')}.", '', '```',
          bench_report.format_tables(b).rstrip(), '```', '',
          '![speedup over AR](bench.png)']


def write_report(workdir: str) -> str:
  files.check_writable(workdir, 'report writes report.md there')
  lines = ['# K-Forcing pipeline report', '',
           f'Work directory: `{os.path.abspath(workdir)}`.', '']
  for section, name, command in ((training_section, None, None),
                                 (quality_section, 'eval.json', 'evaluate'),
                                 (speed_section, 'bench.json', 'bench')):
    try:
      part = section(workdir)
    except (KeyError, TypeError, AttributeError) as e:
      if name is None:
        raise
      # Valid JSON without a field read here (hand-edited, or cut down)
      # stopped `report` with a bare KeyError naming no file.
      raise ValueError(f'{os.path.join(workdir, name)} lacks a field the '
                       f'report reads ({type(e).__name__}: {e}); delete it '
                       'and re-run the command that writes it') from e
    if part:
      lines += part + ['']
    elif name is not None:  # Said, not just left out.
      lines += [f'No {name} in this work directory yet: the `{command}` '
                'subcommand (or `pipeline`) writes it.', '']
  path = os.path.join(workdir, 'report.md')
  if sharding.is_main_process():  # One writer per multi-process run.
    files.atomic_write_text(path, '\n'.join(lines))
  return path
