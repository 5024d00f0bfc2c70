"""What each CLI subcommand does, callable from Python with a flags object."""

import dataclasses
import functools
import json
import os
import re
import sys

import jax
import ml_collections
import numpy as np

from kforcing_jax import checkpoints
from kforcing_jax import data as data_lib
from kforcing_jax import decode
from kforcing_jax import defaults
from kforcing_jax import model as model_lib
from kforcing_jax import sharding
from kforcing_jax import teacher as teacher_lib
from kforcing_jax import train as train_lib


# Exit status of a training command that a SIGTERM stopped after saving
# (128 + 15, as the CLI exits on SIGTERM anywhere else): a scheduler that
# restarts failed jobs, or a `cmd && next` chain, must not take a run that
# stopped half-way for a finished one. Re-running resumes.
STOPPED_EXIT_CODE = 143


def _require_config(flags_obj):
  if flags_obj.config is None:
    raise ValueError('--config is required, e.g. --config=configs/demo.py')
  config = flags_obj.config
  defaults.validate(config)
  defaults.check_kernel_backend(config)
  return config


def train_teacher(flags_obj):
  """Trains (or resumes) the AR teacher in WORKDIR/teacher."""
  config = _require_config(flags_obj)
  result = run_teacher(config, flags_obj.workdir)
  _print_main(json.dumps(summary_of(result), indent=1))
  return STOPPED_EXIT_CODE if result.preempted else 0


def run_teacher(config, workdir: str,
                then_distill: bool = False) -> train_lib.TrainResult:
  """Trains (or resumes) W/teacher. `then_distill` (the pipeline): the
  distillation stages' held-out batches are also built first, so a split
  too short for distill.batch_size stops the run before the teacher
  trains, not after."""
  defaults.check_batches(config, teacher=True, distill=False)
  os.makedirs(workdir, exist_ok=True)
  task = teacher_lib.teacher_task(config)
  # Refuse a mismatched workdir before tokenizing or compiling anything.
  manager = checkpoints.Manager(os.path.join(workdir, task.name))
  manager.check_compatible(checkpoints.run_meta(task.model_cfg, config))
  tokenizer = data_lib.get_tokenizer(
      config, workdir, record_data=True,
      splits=data_lib.training_splits(config, config.train.eval_every))
  done = manager.latest_step()
  finished = done is not None and done >= config.train.num_steps
  train_iter = _train_iterator(config, tokenizer, workdir, finished)
  eval_batches = _stage_eval_batches(config, tokenizer, workdir, 'train',
                                     config.train.eval_batches)
  _note_short_eval('teacher', eval_batches, config.train.eval_batches)
  if then_distill:
    _stage_eval_batches(config, tokenizer, workdir, 'distill', 1)
  if finished:
    past = (f', past train.num_steps={config.train.num_steps} (kept as '
            'trained)' if done > config.train.num_steps else '')
    _print_main(f'[teacher] finished (step {done}{past}): skipped')
  else:
    n = model_lib.count_params(
        jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))
    used, seen = sharding.data_axis_size(config.mesh), jax.device_count()
    devices = f'{used}' if used == seen else f'{used} of {seen}'  # mesh.data
    _print_main(f'[teacher] {n / 1e6:.2f}M parameters, {devices} device(s) '
                f'in {jax.process_count()} process(es), batch '
                f'{config.train.batch_size} x {config.model.seq_len}')
  return train_lib.train(task, config, workdir, train_iter, eval_batches)


def _train_iterator(config, tokenizer, workdir: str, finished: bool):
  """The run's training iterator; made now, so that bad data stops the run
  before any compute, unless the run is finished: it never draws a batch,
  so its data is not read (nor announced) at all."""
  make = functools.partial(
      data_lib.make_train_iterator, config, tokenizer, workdir,
      process_index=jax.process_index(), process_count=jax.process_count())
  return data_lib.LazyIterator(make) if finished else make()


def _stage_eval_batches(config, tokenizer, workdir: str, section: str,
                        num_batches: int) -> list:
  """The held-out batches of a training stage (`section` 'train' or
  'distill': its batch_size and eval_every), none with evals off. A split
  too short for one batch names the settings that can fix it."""
  settings = config[section]
  if not settings.eval_every:
    return []
  try:
    return data_lib.make_eval_batches(config, tokenizer, workdir,
                                      batch_size=settings.batch_size,
                                      num_batches=num_batches)
  except ValueError as e:
    raise ValueError(
        f'{section}.batch_size={settings.batch_size} (its held-out evals, '
        f'{section}.eval_every={settings.eval_every}): {e} Lower the batch '
        f'size, give data.eval_split more text, or set {section}.eval_every=0 '
        'to train without held-out evals.') from e


def _note_short_eval(stage: str, batches, wanted: int) -> None:
  """A short held-out split gives fewer eval batches than asked for
  (train.eval_batches, distill.eval_batches): said, not silently used."""
  if batches and len(batches) < wanted:
    _print_main(f'[{stage}] NOTE: the held-out split gives {len(batches)} '
                f'of the {wanted} eval batches asked for '
                f'({len(batches[0])} sequences each); its evals use those')


_print_main = sharding.print_once  # Once per run, not once per process.


def summary_of(result: train_lib.TrainResult) -> dict:
  out = {'run_dir': result.run_dir, 'step': int(result.state.step),
         'preempted': result.preempted}
  if result.tokens_per_s:
    out['train_tokens_per_s'] = round(result.tokens_per_s, 1)
    out['seconds'] = round(result.seconds, 1)
  if result.last_eval:
    # The last evaluation may predate the final (e.g. SIGTERM) step.
    ev = dict(result.last_eval)
    out['eval_step'] = ev.pop('step', None)
    out.update(ev)
  return out


def load_run_config(workdir: str, run: str = teacher_lib.TEACHER):
  """The experiment config saved with a run's latest checkpoint."""
  meta = checkpoints.Manager(os.path.join(workdir, run)).read_meta()
  return ml_collections.ConfigDict(meta['config'])


def pick_run(workdir: str, k: int, model: str = '') -> str:
  """Run directory name to decode with: explicit, or by k."""
  if model:
    # A run of this workdir by name: a path would decode another run with
    # this workdir's tokenizer.
    if not re.fullmatch(r'teacher|student_k[1-9][0-9]*', model):
      raise ValueError(f"--model={model!r}: expected 'teacher' or "
                       "'student_kN' (a run in --workdir)")
    return model
  if k == 1:
    return teacher_lib.TEACHER
  windows = checkpoints.trained_windows(workdir)
  fits = [w for w in windows if w >= k]
  if not fits:
    raise ValueError(f'k={k}: no student in {workdir} was trained with a '
                     f'window >= {k} (found windows {windows}); run distill')
  return f'student_k{fits[0]}'


def _note_ignored_model_fields(given, saved, run: str):
  """Says which of --config's model fields differ from the run's own: the
  run decodes with the model it was trained as, whatever --config says."""
  differ = sorted(f'model.{key}={value!r}'
                  for key, value in given.model.items()
                  if key in saved.model and value != saved.model[key])
  if differ:
    _print_main(f"NOTE: {', '.join(differ)} ignored: {run} decodes as it "
                'was trained (its saved config); --config gives generate '
                'only its decode.* settings', file=sys.stderr)


def generate(flags_obj):
  """Decodes continuations of --prompt texts with a trained run."""
  workdir = flags_obj.workdir
  if not os.path.isdir(workdir):
    raise ValueError(f'--workdir={workdir} does not exist; train first')
  if flags_obj.k < 1:
    raise ValueError(f'--k={flags_obj.k} must be >= 1')
  if flags_obj.seed is not None:
    defaults.check_seed('--seed', flags_obj.seed)
  run = pick_run(workdir, flags_obj.k, flags_obj.model)
  cfg, params, meta = checkpoints.load_params(os.path.join(workdir, run))
  config = ml_collections.ConfigDict(meta['config'])
  # The tokenizer belongs to the trained run; decode defaults come from
  # --config (with its --config.decode.* overrides) when one is given.
  # Prompts only: the corpus may have moved or changed since training.
  if not config.data.tokenizer_path and not os.path.exists(
      os.path.join(workdir, 'tokenizer.model')):
    # get_tokenizer would train a new one: ids the run never saw.
    raise ValueError(f'{workdir} has no tokenizer.model, the tokenizer {run} '
                     'was trained with; generate decodes only with it')
  tokenizer = data_lib.get_tokenizer(config, workdir, check_data=False)
  if flags_obj.config is not None:
    _note_ignored_model_fields(flags_obj.config, config, run)
    config = flags_obj.config
  defaults.check_kernel_backend(config)
  # The run's shape decodes, whatever --config's model says.
  defaults.check_run_attention(defaults.attention_impl(config), cfg.d_model,
                               cfg.num_heads, run)
  dc = config.decode

  def pick(flag_value, default):
    return default if flag_value is None else flag_value

  prompts = flags_obj.prompt or ['The']
  ids = [tokenizer.encode(p) for p in prompts]
  empty = [p for p, i in zip(prompts, ids) if not i]
  if empty:
    raise ValueError(f'prompt {empty[0]!r} encodes to no tokens')
  max_new = model_lib.as_int(
      pick(flags_obj.max_new_tokens, dc.max_new_tokens),
      'decode.max_new_tokens' if flags_obj.max_new_tokens is None else
      '--max_new_tokens', 1)
  longest = max(len(i) for i in ids)
  room = cfg.seq_len - longest
  if room < 1:
    raise ValueError(f'a prompt is {longest} tokens but model.seq_len is '
                     f'{cfg.seq_len}: no room to generate (shorten it)')
  if max_new > room:
    _print_main(f'NOTE: max_new_tokens={max_new} cut to {room}: the longest '
                f'prompt has {longest} token{"s" * (longest != 1)} and '
                f'model.seq_len is {cfg.seq_len}', file=sys.stderr)
    max_new = room
  seed = pick(flags_obj.seed, dc.seed)
  defaults.check_seed('decode.seed' if flags_obj.seed is None else '--seed',
                      seed)
  temperature = pick(flags_obj.temperature, dc.temperature)
  greedy = pick(flags_obj.greedy, dc.greedy)
  # Runs saved before decode.readout have none: the argmax, as then.
  readout = pick(flags_obj.readout, dc.get('readout', 'argmax'))
  if readout not in decode.READOUTS:
    raise ValueError(f'decode.readout={readout!r}: expected one of '
                     f'{decode.READOUTS}')
  if cfg.noise_window:
    # AR sampling settings mean nothing to an argmax student: not passed on
    # (so not checked either), and a flag that sets one is said to be
    # ignored. A sampled or median readout takes the temperature.
    ignored = (['--greedy'] if flags_obj.greedy else []) + (
        ['--temperature'] if flags_obj.temperature is not None and
        readout == 'argmax' else [])
    if ignored:
      how = {'argmax': 'argmax; --readout=sample or =median reads its '
                       'softmax at --temperature',
             'sample': 'sampled from its softmax at --temperature',
             'median': 'the median of its softmax at --temperature'}[readout]
      _print_main(f"NOTE: {' and '.join(ignored)} ignored: a student's "
                  f'tokens are its readout of its noise slots ({how})',
                  file=sys.stderr)
    greedy = False
    if readout == 'argmax':
      temperature = 1.0
  else:
    if flags_obj.readout not in (None, 'argmax'):
      _print_main(f'NOTE: --readout={flags_obj.readout} ignored: it is a '
                  "student's; the AR teacher samples by inverse CDF of its "
                  'noise already', file=sys.stderr)
    readout = 'argmax'
    if greedy and flags_obj.temperature is not None:
      _print_main(f'NOTE: --temperature={flags_obj.temperature} ignored: '
                  'greedy decoding takes the argmax', file=sys.stderr)
  out = decode.generate(
      params, cfg, ids, max_new_tokens=max_new, k=flags_obj.k,
      rng=jax.random.PRNGKey(seed), temperature=temperature, greedy=greedy,
      frequency_penalty=pick(flags_obj.frequency_penalty,
                             dc.frequency_penalty),
      eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
      kernel_impl=config.get('kernels', {}).get('impl', 'auto'),
      attention_impl=defaults.attention_impl(config), readout=readout)
  for prompt, prompt_ids, row, n in zip(prompts, ids, out.tokens,
                                       out.lengths):
    # Decode prompt and continuation together so word boundaries survive.
    text = tokenizer.decode(prompt_ids + np.asarray(row[:n]).tolist())
    # new_tokens counts a final eos, which text (decoded) does not show.
    _print_main(json.dumps({'model': run, 'k': flags_obj.k,
                            'prompt': prompt, 'new_tokens': int(n),
                            'stopped_at_eos': bool(
                                n and int(row[n - 1]) == tokenizer.eos_id),
                            'text': text}))


def stage_config(config, window: int):
  """A copy of `config` whose `train` section is the distillation recipe of
  the stage of `window`."""
  out = config.copy_and_resolve_references()
  out.unlock()
  ds, tc = out.distill, out.train
  tc.batch_size = ds.batch_size
  tc.num_steps = defaults.stage_steps(ds, window)[1]
  tc.lr = ds.lr
  tc.warmup_steps = ds.warmup_steps
  tc.schedule = 'constant'  # Paper: constant schedule, Adam (0.9, 0.999).
  tc.b2 = 0.999
  tc.weight_decay = 0.0
  tc.ema_decay = ds.ema_decay
  tc.checkpoint_every = ds.checkpoint_every
  tc.eval_every = ds.eval_every
  # The shard_map distillation step keeps the student replicated (paper
  # scale: ~135M params, ~2 GiB of state per device), so FSDP is off here.
  out.mesh.fsdp = False
  return out


def distill_cmd(flags_obj):
  """Distils students of every window in distill.windows (resumable)."""
  config = _require_config(flags_obj)
  results = run_distill(config, flags_obj.workdir)
  _print_main(json.dumps([summary_of(r) for r in results], indent=1))
  return STOPPED_EXIT_CODE if any(r.preempted for r in results) else 0


def run_distill(config, workdir: str,
                on_result=None) -> list[train_lib.TrainResult]:
  """Runs the chain of stages; finished stages are loaded, not redone.

  on_result(TrainResult), if given, is called as each stage returns (the
  pipeline records its timing then, not only at the end).
  """
  from kforcing_jax import distill as distill_lib  # pylint: disable=g-import-not-at-top
  defaults.check_batches(config, teacher=False, distill=True)
  distill_lib.check_precision(config.distill.precision)
  teacher_dir = os.path.join(workdir, teacher_lib.TEACHER)
  teacher_cfg, teacher_params, teacher_meta = checkpoints.load_params(
      teacher_dir)
  teacher_step = checkpoints.Manager(teacher_dir).latest_step()
  if teacher_step < config.train.num_steps:
    _print_main(f'[distill] WARNING: the teacher is at step {teacher_step} '
                f'of train.num_steps={config.train.num_steps} (unfinished); '
                'distilling from it anyway')
  # The students take the config's noise-encoder fields (model.noise_*),
  # which the teacher does not have, on the teacher's backbone.
  requested = model_lib.ModelConfig.from_config(config.model)
  distill_lib.check_fit(teacher_cfg, dataclasses.replace(
      requested, noise_window=max(config.distill.windows)))
  # So do the compute dtype and dropout, which need not match the teacher's
  # (check_fit compares shapes): said, since a workdir usually means one.
  unlike = [f'model.{f}={getattr(requested, f)!r} (teacher: '
            f'{getattr(teacher_cfg, f)!r})' for f in ('dtype', 'dropout_rate')
            if getattr(requested, f) != getattr(teacher_cfg, f)]
  if unlike:
    _print_main(f"[distill] NOTE: the students take {', '.join(unlike)} "
                'from --config; pass the teacher\'s values to match it')
  tokenizer = data_lib.get_tokenizer(
      config, workdir,
      splits=data_lib.training_splits(config, config.distill.eval_every))
  num_eval = config.distill.eval_batches
  eval_batches = _stage_eval_batches(config, tokenizer, workdir, 'distill',
                                     num_eval)
  _note_short_eval('distill', eval_batches, num_eval)
  ds = config.distill
  results = []
  prev_params = teacher_params
  teacher_source = checkpoints.source_record(teacher_lib.TEACHER,
                                             teacher_step, teacher_meta)
  prev_source = teacher_source
  prev_cfg = teacher_cfg
  fsdp_said = False
  for window in ds.windows:
    student_cfg = distill_lib.student_config(requested, window)
    if ds.method == 'self_forcing':
      # The previous stage's student, as its checkpoint saved it.
      source_cfg, frozen, source = prev_cfg, prev_params, prev_source
    else:  # Noise inversion always targets data under the AR teacher.
      source_cfg, frozen, source = teacher_cfg, teacher_params, teacher_source
    stage = distill_lib.Stage(
        window=window, method=ds.method, student_cfg=student_cfg,
        source_cfg=source_cfg, num_windows=ds.num_windows,
        precision=ds.precision, kernel_impl=config.kernels.impl,
        teacher_temperature=float(ds.teacher_temperature),
        readout=ds.readout,
        readout_temperature=float(ds.readout_temperature))
    task = distill_lib.stage_task(stage, init_from=prev_params, frozen=frozen,
                                  source=source)
    done = checkpoints.Manager(os.path.join(workdir, task.name)).latest_step()
    source_name = ('the AR teacher' if source_cfg.noise_window == 0 else
                   f'student_k{source_cfg.noise_window}')
    if source_cfg.noise_window and ds.readout != 'argmax':
      source_name += (f' (its {ds.readout} readout at temperature '
                      f'{ds.readout_temperature:g})')
    steps_field, steps = defaults.stage_steps(ds, window)
    finished = done is not None and done >= steps
    if finished:
      past = (f', past {steps_field}={steps} (kept as trained)'
              if done > steps else '')
      _print_main(f'[{task.name}] stage k={window} finished (step {done}'
                  f'{past}): skipped')
    else:
      _print_main(
          f'[{task.name}] stage k={window} ({ds.method}) from {source_name}'
          f'; {distill_lib.describe_transfer(prev_params, student_cfg)}')
      if config.mesh.fsdp and not fsdp_said:  # stage_config turns it off.
        fsdp_said = True
        _print_main('[distill] NOTE: mesh.fsdp=True applies to the teacher '
                    'only: the distillation step keeps the student and its '
                    'frozen source replicated on every device')
    sconfig = stage_config(config, window)
    train_iter = _train_iterator(sconfig, tokenizer, workdir, finished)
    result = train_lib.train(task, sconfig, workdir, train_iter, eval_batches)
    results.append(result)
    if on_result is not None:
      on_result(result)
    if result.preempted:  # SIGTERM: saved; later stages wait for a re-run.
      break
    prev_cfg, prev_params, prev_meta = checkpoints.load_params(
        result.run_dir)
    prev_source = checkpoints.source_record(task.name, result.state.step,
                                            prev_meta)
  return results


def train_evaluator_cmd(flags_obj):
  """Trains the small independent evaluator LM into W/evaluator (torch)."""
  from kforcing_jax import evaluator_train  # pylint: disable=g-import-not-at-top
  path = evaluator_train.train_evaluator(_require_config(flags_obj),
                                         flags_obj.workdir)
  _print_main(f'evaluator: {path} (use --config.eval.evaluator={path})')


def evaluate_cmd(flags_obj):
  """Samples every trained model and writes W/eval.json, W/samples/."""
  from kforcing_jax import evaluate  # pylint: disable=g-import-not-at-top
  evaluate.run_evaluate(_require_config(flags_obj), flags_obj.workdir)


def bench_cmd(flags_obj):
  """Times AR vs push-forward decoding; writes W/bench.json, W/bench.png."""
  from kforcing_jax import bench  # pylint: disable=g-import-not-at-top
  bench.run_bench(_require_config(flags_obj), flags_obj.workdir)


def report_cmd(flags_obj):
  """Writes W/report.md from the runs and results W holds (no config)."""
  from kforcing_jax import report  # pylint: disable=g-import-not-at-top
  workdir = flags_obj.workdir
  parts = [os.path.join(workdir, name) for name in (
      teacher_lib.TEACHER, 'eval.json', 'bench.json')]
  if not any(os.path.exists(p) for p in parts):
    raise ValueError(f'--workdir={workdir} holds no teacher, eval.json or '
                     'bench.json: nothing to report')
  _print_main(f'[report] wrote {report.write_report(workdir)}')


def pipeline_cmd(flags_obj):
  """Teacher, distillation, evaluation, benchmark and W/report.md."""
  from kforcing_jax import pipeline  # pylint: disable=g-import-not-at-top
  report = pipeline.run_pipeline(_require_config(flags_obj), flags_obj.workdir)
  return STOPPED_EXIT_CODE if report is None else 0
