"""Sample-quality evaluation of the AR teacher and the K-Forcing students.

Protocol (the paper's): the first `eval.prefix_len` (6) tokens of held-out
sequences are completed to the model's `seq_len` by every model with ONE
shared noise array (seed `eval.seed`), so token n of sample i is decoded from
noise[i, n] by the teacher (inverse CDF, temperature 1) and by every student
(noise slot). Decoding is fixed-length: no early stop at eos (in the
concat-then-chunk stream eos only separates documents).

Models, in order: 'data' (the held-out continuations themselves, a
reference row with no decoding), 'teacher' (k=1), and 'student_k<k>' for
k in `eval.ks` (default 1..the largest trained window), each decoded by the
smallest trained student window >= k, plus 'student_k<k>_penalty' where
`eval.penalties[k]` > 0 (docs/METHOD.md's frequency penalty), and where
`eval.sample_temperature` > 0 the same one or two again with the student's
sampled readout at that temperature ('student_k<k>_sample',
'student_k<k>_penalty_sample'; decode.DecodeSpec.readout; argmax
everywhere else), and where `eval.median_temperature` > 0 again with its
median readout ('student_k<k>_median', 'student_k<k>_penalty_median').

Metrics (all on the generated tokens only, prefix excluded; per sample, then
the mean over samples with a bootstrap CI over samples; the perplexities
pool tokens instead: exp(total NLL / total tokens), each bootstrap draw
recomputing that ratio):
  teacher_ppl     exp(mean NLL per generated token) under the AR teacher's
                  full causal forward over [prefix | generated].
  evaluator_ppl   the same under an independent HF causal LM
                  (`eval.evaluator`, a local path): samples are decoded to
                  text (each eos written as the evaluator's own eos token,
                  e.g. <|endoftext|>, as between its training documents)
                  and re-tokenised by the evaluator's tokenizer; the
                  scored tokens are the continuation, i.e. those after the
                  longest common token prefix of tokenize(prefix text) and
                  tokenize(full text), each with the special tokens its
                  tokenizer puts in front (a BOS) but none it appends (a
                  sample is not a finished document). A text longer than
                  the evaluator's context is cut to it (a note in
                  eval.json says how many samples and tokens). null when
                  no evaluator is set.
  entropy         unigram entropy (nats) of each sample's generated tokens.
  distinct_n      unique n-grams / total n-grams of each sample, n = 1..4.
  repetition_4    fraction of generated tokens covered by a 4-gram that
                  already occurred earlier in the same sample.
  coupling        students only, against the teacher's rollout from the same
                  prefix and noise: `agreement` (fraction of positions where
                  student token == teacher token), `per_slot[s]` (the same
                  over positions n with n % k == s) and `first_divergence`
                  (number of tokens before the first mismatch; the full length
                  when there is none); `forced_agreement` and
                  `forced_per_slot[s]`: the same against the teacher's
                  token at each of the student's positions given the
                  student's own context and the same u (after a first
                  mismatch the rollout's context is another, so
                  `agreement` says little about later positions; these
                  measure every slot throughout; a note gives their
                  ceiling when the teacher, forced on its own rollout,
                  does not reproduce all of it: a little in float32,
                  more in bfloat16);
                  `noise_sweep` (unpenalised argmax- and median-readout
                  rows with eval.sweep_contexts > 0): slot 1's map, by
                  the row's readout, against the teacher's over a u grid
                  at held-out contexts, see noise_sweep.py. Both compare
                  with the teacher at temperature 1, also for students
                  distilled at another distill.teacher_temperature (a
                  note says so).
Perplexity CIs resample samples and recompute exp(total NLL / total tokens).

Its parts: `eval_settings` (the config section), `eval_metrics` (the
statistics above and their bootstrap CIs), `hf_evaluator` (the independent
evaluator), `eval_schema` (eval.json, the samples files and their check).
"""

import dataclasses
import json
import math
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import checkpoints
from kforcing_jax import data as data_lib
from kforcing_jax import defaults
from kforcing_jax import decode
from kforcing_jax import eval_metrics
from kforcing_jax import eval_schema
from kforcing_jax import eval_settings
from kforcing_jax import files
from kforcing_jax import hf_evaluator
from kforcing_jax import noise_sweep
from kforcing_jax import projection
from kforcing_jax import sharding

_show = sharding.print_once  # Once per run, not once per process.


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  name: str  # Row name and samples file stem.
  kind: str  # 'data', 'teacher' or 'student'.
  run: str | None  # Run directory name under the workdir.
  k: int
  penalty: float = 0.0
  readout: str = 'argmax'  # A student's (decode.READOUTS).
  temperature: float = 1.0  # Of a student's sampled or median readout.


def plan_models(windows: Sequence[int],
                s: eval_settings.EvalSettings) -> list[ModelEntry]:
  """The rows to evaluate (module docstring), given the trained windows."""
  plan = [ModelEntry('data', 'data', None, 1),
          ModelEntry('teacher', 'teacher', 'teacher', 1)]
  ks = s.ks or tuple(range(1, max(windows, default=0) + 1))
  readouts = [('argmax', 1.0, '')]
  for readout, temperature in (('sample', s.sample_temperature),
                               ('median', s.median_temperature)):
    if temperature > 0:
      readouts.append((readout, temperature, f'_{readout}'))
  for k in ks:
    fits = [w for w in windows if w >= k]
    if not fits:
      raise ValueError(f'eval.ks asks for k={k} but no student was trained '
                       f'with a window >= {k} (found {list(windows)})')
    run = f'student_k{fits[0]}'
    penalties = (0.0, s.penalty(k)) if s.penalty(k) > 0 else (0.0,)
    for readout, temperature, suffix in readouts:
      for penalty in penalties:
        name = f'student_k{k}' + ('_penalty' if penalty else '') + suffix
        plan.append(ModelEntry(name, 'student', run, k, penalty, readout,
                               temperature))
  return plan


def generate_fixed(cfg, params, prefixes_BxP, noise_BxT, k: int,
                   penalty: float = 0.0,
                   kernel_impl: str = 'auto',
                   attention_impl: str = 'auto', readout: str = 'argmax',
                   temperature: float = 1.0) -> np.ndarray:
  """Exactly T = noise.shape[1] new tokens, k per pass, within seq_len.

  When k does not divide T, the last r = T % k tokens come from one more
  pass with r noise slots over [prefix | tokens so far]. A noise slot sees
  only slots before it, so this equals a full k-slot step with its extra
  tokens dropped, without running past model.seq_len.
  """
  max_new = noise_BxT.shape[1]
  main = max_new // k * k
  parts = []
  same = dict(frequency_penalty=penalty, eos_id=None, kernel_impl=kernel_impl,
              attention_impl=attention_impl, readout=readout,
              temperature=temperature)
  if main:
    parts.append(decode.generate(
        params, cfg, prefixes_BxP, max_new_tokens=main, k=k,
        noise=noise_BxT[:, :main], **same).tokens)
  if main < max_new:
    context = np.concatenate([prefixes_BxP] + parts, axis=1)
    parts.append(decode.generate(
        params, cfg, context, max_new_tokens=max_new - main,
        k=max_new - main, noise=noise_BxT[:, main:], **same).tokens)
  return np.concatenate(parts, axis=1)


def decode_all(cfg, params, entry: ModelEntry, prefixes_NxP, noise_NxT,
               batch_size: int, kernel_impl: str = 'auto',
               attention_impl: str = 'auto'):
  """Decodes every prefix in batches. Returns (tokens (N, T), timing dict).

  Batches are padded to batch_size (one compilation per model). tokens/s
  counts every decoded row, a last partial batch's padding rows included
  (they cost as much as real ones), and excludes the first batch
  (compilation) when there is more than one.
  """
  n, max_new = noise_NxT.shape
  outs, times = [], []
  for lo in range(0, n, batch_size):
    rows = min(batch_size, n - lo)
    t0 = time.perf_counter()
    tokens = generate_fixed(
        cfg, params,
        eval_metrics.pad_rows(prefixes_NxP[lo:lo + rows], batch_size),
        eval_metrics.pad_rows(noise_NxT[lo:lo + rows], batch_size), entry.k,
        entry.penalty, kernel_impl, attention_impl, entry.readout,
        entry.temperature)
    times.append((time.perf_counter() - t0, batch_size * max_new))
    outs.append(tokens[:rows])
  steady = times[1:] or times
  seconds = sum(t for t, _ in times)
  tps = sum(c for _, c in steady) / max(sum(t for t, _ in steady), 1e-9)
  return np.concatenate(outs), {'seconds': seconds, 'tokens_per_s': tps,
                                'includes_compile': len(times) == 1}


def eval_sequences(config, tokenizer, workdir: str,
                   s: eval_settings.EvalSettings,
                   notes: list[str]) -> np.ndarray:
  """The first num_samples held-out sequences, (N, seq_len)."""
  split = s.split or config.data.eval_split
  batches = data_lib.make_eval_batches(
      config, tokenizer, workdir, batch_size=1, num_batches=s.num_samples,
      split=split)
  seqs = np.concatenate(batches)
  if len(seqs) < s.num_samples:
    notes.append(f'split {split!r} has only {len(seqs)} sequences; '
                 f'evaluated {len(seqs)} of eval.num_samples='
                 f'{s.num_samples}')
  return seqs


def forced_ceiling_note(forced_NxT, rollout_NxT, dtype: str) -> str | None:
  """A note when the teacher, forced on its own rollout, does not give it
  back: the forced tokens come from its full forward, the rollout from its
  cached decode, and the two round differently (most in bfloat16; the demo
  in float32 gives back 0.9997), so inverse-CDF samples near a boundary
  flip. That agreement bounds every student's forced_agreement."""
  equal = np.asarray(forced_NxT) == np.asarray(rollout_NxT)
  if equal.all():
    return None
  # With the count: a rate of 0.99996 prints as 1.0000 at four places.
  differ = int(equal.size - equal.sum())
  return (f'teacher-forced ceiling: the teacher forced on its own rollout '
          f'agrees on {equal.mean():.4f} of its tokens ({differ} of '
          f'{equal.size} differ: its full forward and its cached decode '
          f'round differently in {dtype}); the students\' forced_agreement '
          'is bounded by it')


def _mean_or_none(total: float, count: int):
  return float(total / count) if count > 0 else None


def _model_row(entry, tokens_NxT, teacher_nll, evaluator_nll, teacher_tokens,
               timing, s: eval_settings.EvalSettings, sweep=None,
               forced_NxT=None):
  """The eval.json entry of one model (its schema: eval_schema.py)."""
  ci = dict(num_resamples=s.bootstrap, seed=s.seed, level=s.ci_level)

  def boot(values):
    return eval_metrics.bootstrap_ci(values, **ci)

  stats = eval_metrics.text_stats(tokens_NxT)
  metrics = {'teacher_ppl': eval_metrics.perplexity_ci(*teacher_nll, s),
             'evaluator_ppl': (None if evaluator_nll is None else
                               eval_metrics.perplexity_ci(*evaluator_nll, s))}
  metrics.update({key: boot(v) for key, v in stats.items()})
  coupling = None
  if entry.kind == 'student':
    c = eval_metrics.coupling_stats(tokens_NxT, teacher_tokens, entry.k,
                                    forced_NxT)

    def slots(name):  # One interval per slot of a step.
      return [boot(c[name][:, i]) for i in range(entry.k)]

    coupling = {
        'agreement': boot(c['agreement']),
        'per_slot': slots('per_slot'),
        'first_divergence': boot(c['first_divergence']),
        'noise_sweep': (None if sweep is None else noise_sweep.to_json(
            sweep, s.sweep_grid, boot))}
    if forced_NxT is not None:
      coupling['forced_agreement'] = boot(c['forced_agreement'])
      coupling['forced_per_slot'] = slots('forced_per_slot')
  return {'kind': entry.kind, 'run': entry.run, 'k': entry.k,
          'penalty': float(entry.penalty), **_readout(entry),
          'samples_file': f'samples/{entry.name}.jsonl',
          'decode': timing, 'metrics': metrics, 'coupling': coupling}, stats


def _readout(entry) -> dict:
  """A student's readout and its temperature; nothing for the teacher,
  which samples its u itself, or the data."""
  if entry.kind != 'student':
    return {}
  return {'readout': entry.readout, 'temperature': float(entry.temperature)}


def _sample_lines(entry, prefixes, tokens, prefix_texts, texts, teacher_nll,
                  evaluator_nll, entropy) -> str:
  lines = []
  for i in range(len(tokens)):
    ev = (None if evaluator_nll is None else
          _mean_or_none(evaluator_nll[0][i], evaluator_nll[1][i]))
    lines.append(json.dumps({
        'index': i, 'model': entry.name, 'k': entry.k,
        'penalty': float(entry.penalty), **_readout(entry),
        'prefix': prefix_texts[i],
        'text': texts[i], 'prefix_ids': prefixes[i].tolist(),
        'token_ids': tokens[i].tolist(),
        'teacher_nll': _mean_or_none(teacher_nll[0][i], teacher_nll[1][i]),
        'evaluator_nll': ev,
        'evaluator_tokens': (None if evaluator_nll is None else
                             int(evaluator_nll[1][i])),
        'entropy': (None if math.isnan(entropy[i]) else float(entropy[i]))},
                            ensure_ascii=False))
  return '\n'.join(lines) + '\n'


def _load_teacher(workdir: str, config):
  cfg, params, _ = checkpoints.load_params(os.path.join(workdir, 'teacher'))
  if cfg.seq_len != config.model.seq_len:
    raise ValueError(
        f'config model.seq_len={config.model.seq_len} but the teacher in '
        f'{workdir} was trained with seq_len={cfg.seq_len}; evaluate with the '
        "run's config")
  return cfg, params


def _stale_source(workdir: str, run: str, meta: dict) -> str | None:
  """Why `run` no longer matches the run it was distilled from (trained on
  since), or None. Its coupling and teacher scores would compare it with
  a teacher it never saw."""
  source = meta.get('source')
  if not source:
    return None
  now = checkpoints.run_record(workdir, source['run'])
  if now is not None and checkpoints.same_source(source, now):
    return None
  return (f'{run} was distilled from {checkpoints.describe_change(source, now)}'
          f': {run} is stale (delete it and the stages after it, then re-run '
          'distill)')


def _temperature_note(run: str, meta: dict) -> str | None:
  """Says that `run` learnt from the teacher at another temperature
  (distill.teacher_temperature, from its saved config; its later stages
  inherit it), or None: its coupling and noise sweep compare it with the
  teacher this evaluation samples, at temperature 1."""
  saved = ((meta.get('config') or {}).get('distill') or {})
  temperature = saved.get('teacher_temperature', 1.0)
  if temperature == 1.0:
    return None
  return (f'{run} was distilled with distill.teacher_temperature='
          f'{temperature}: its coupling and noise sweep compare it with the '
          'teacher at temperature 1, the teacher evaluated here')


def _readout_note(run: str, window: int, meta: dict) -> str | None:
  """Says that `run` (a student of `window` > 1) learnt from sampled or
  median rollouts of the previous student (distill.readout, from its saved
  config), or None: nothing in its rows tells it from one distilled the
  paper's way."""
  saved = ((meta.get('config') or {}).get('distill') or {})
  if window < 2 or saved.get('readout', 'argmax') == 'argmax':
    return None
  rollouts = {'sample': 'sampled'}.get(saved['readout'], saved['readout'])
  return (f"{run} was distilled with distill.readout={saved['readout']!r} "
          'at distill.readout_temperature='
          f"{saved.get('readout_temperature', 1.0)}: it learnt "
          f"student_k{window // 2}'s {rollouts} rollouts, not its argmax")


def run_evaluate(config, workdir: str) -> dict:
  """Evaluates teacher and students in `workdir`; writes eval.json + samples.

  Returns the eval.json dict (already validated).
  """
  s = eval_settings.settings_from_config(config)
  # Before any decoding: its results go there.
  for folder in (workdir, os.path.join(workdir, 'samples')):
    if os.path.isdir(folder):  # A missing workdir: no teacher, below.
      files.check_writable(folder, 'evaluate writes eval.json and samples/ '
                           'there; pass another --workdir or make it '
                           'writable')
  # Decoding's vocabulary projection (projection.py), as generate uses it.
  kernel_impl = projection.check_impl(str(
      (config.get('kernels', None) or {}).get('impl', 'auto')))
  # Fails on a bad evaluator before any decoding.
  evaluator = hf_evaluator.load_evaluator(s)
  teacher_cfg, teacher_params = _load_teacher(workdir, config)
  if not 1 <= s.prefix_len < teacher_cfg.seq_len:
    raise ValueError(f'eval.prefix_len={s.prefix_len} must be in [1, '
                     f'seq_len={teacher_cfg.seq_len})')
  plan = plan_models(checkpoints.trained_windows(workdir), s)
  notes = []
  if not any(e.kind == 'student' for e in plan):
    notes.append(f'no student_k* run in {workdir}: teacher only')
  evaluated = {e.k for e in plan if e.kind == 'student'}
  unused = sorted(k for k, lam in s.penalties if lam > 0 and k not in evaluated)
  if unused:  # Dropped without a word before.
    notes.append(f"eval.penalties for k={', '.join(map(str, unused))} "
                 'unused: no student row has that k (eval.ks, or every k '
                 'up to the largest trained window)')
  if evaluator is None:
    notes.append('eval.evaluator is empty: evaluator_ppl skipped')
  prefix_split = [('eval.split', s.split or config.data.eval_split)]
  tokenizer = data_lib.get_tokenizer(config, workdir, splits=prefix_split)
  # Notes said as they arise (get_tokenizer says these): recorded in
  # eval.json, not repeated in the closing list.
  said = data_lib.training_text_notes(config, prefix_split)
  notes += said
  seqs = eval_sequences(config, tokenizer, workdir, s, notes)
  prefixes = seqs[:, :s.prefix_len]
  max_new = teacher_cfg.seq_len - s.prefix_len
  # One noise array shared by every model: it is what couples them.
  noise = np.asarray(jax.random.uniform(jax.random.PRNGKey(s.seed),
                                        (len(seqs), max_new), jnp.float32))
  prefix_texts = [tokenizer.decode(p) for p in prefixes]
  if evaluator is not None:  # The same prefixes for every model.
    separator = evaluator.document_separator
    evaluator_prefixes = [hf_evaluator.evaluator_text(tokenizer, p, separator)
                          for p in prefixes]
  teacher_scores = eval_metrics.teacher_scores_fn(teacher_cfg, teacher_params)
  # Every run is restored before any scoring, so a damaged student
  # checkpoint stops evaluate at once, not after the earlier models.
  loaded = {'teacher': (teacher_cfg, teacher_params)}
  for entry in plan:
    if entry.run is not None and entry.run not in loaded:
      cfg, params, meta = checkpoints.load_params(os.path.join(workdir,
                                                               entry.run))
      loaded[entry.run] = cfg, params
      stale = _stale_source(workdir, entry.run, meta)
      if stale:
        notes.append(stale)
        said.append(stale)
        _show(f'[eval] WARNING: {stale}', flush=True)
      for note in (_temperature_note(entry.run, meta),
                   _readout_note(entry.run, cfg.noise_window, meta)):
        if note:
          notes.append(note)
  attention = defaults.attention_impl(config)
  for run, (cfg, _) in loaded.items():  # Their own shapes, before decoding.
    defaults.check_run_attention(attention, cfg.d_model, cfg.num_heads, run)
  # The checkpoint of every run here: a re-run tells a result of older
  # models by these, not by file times (a copied workdir has new ones).
  records = checkpoints.workdir_records(workdir)
  notes += checkpoints.unfinished_runs(
      {run: records[run] for run in loaded if run in records}, config,
      workdir)
  models, teacher_tokens, sample_files = {}, None, {}
  sweeper = _Sweeper(s, teacher_cfg, teacher_params, seqs, loaded, notes)
  for entry in plan:
    if entry.kind == 'data':
      tokens, timing = np.asarray(seqs[:, s.prefix_len:]), None
    else:
      tokens, timing = decode_all(*loaded[entry.run], entry, prefixes, noise,
                                  s.batch_size, kernel_impl, attention)
    if entry.kind == 'teacher':
      teacher_tokens = tokens
    full = np.concatenate([prefixes, tokens], axis=1)
    texts = [tokenizer.decode(row) for row in full]
    # One teacher forward gives both its NLL of the sample and the tokens
    # it would have emitted at each position (the forced coupling).
    t_lp, forced = eval_metrics.batched(teacher_scores, (full, noise),
                                        s.batch_size)
    t_nll = eval_metrics.nll_from_logprobs(t_lp, s.prefix_len)
    e_nll = None
    if evaluator is not None:
      *e_nll, cut = evaluator.nll(
          evaluator_prefixes,
          [hf_evaluator.evaluator_text(tokenizer, row, separator)
           for row in full])
      if cut.any():
        notes.append(
            f'{entry.name}: {int((cut > 0).sum())} of {len(cut)} samples '
            f'are longer than the evaluator\'s {evaluator.max_len} '
            f'positions in its tokens; their last {int(cut.sum())} tokens '
            'in all are not scored in evaluator_ppl')
    if entry.kind == 'data':
      forced = None  # The data were not drawn with this noise.
    if entry.kind == 'teacher':
      note = forced_ceiling_note(forced, tokens, teacher_cfg.dtype)
      if note:
        notes.append(note)
    row, stats = _model_row(entry, tokens, t_nll, e_nll, teacher_tokens,
                            timing, s, sweeper.per_context(entry), forced)
    models[entry.name] = row
    # Written with eval.json at the end: a run that fails part-way leaves
    # the previous eval.json and the samples it describes as they were.
    sample_files[row['samples_file']] = _sample_lines(
        entry, prefixes, tokens, prefix_texts, texts, t_nll, e_nll,
        stats['entropy'])
    _print_progress(entry, row, len(tokens), max_new)
  result = {
      'schema_version': eval_schema.SCHEMA_VERSION,
      'name': str(config.get('name', '')),
      'settings': {
          'prefix_len': s.prefix_len, 'max_new_tokens': max_new,
          'seq_len': teacher_cfg.seq_len, 'num_samples': len(seqs),
          'batch_size': s.batch_size, 'seed': s.seed,
          'bootstrap': s.bootstrap, 'ci_level': s.ci_level,
          'split': s.split or config.data.eval_split,
          'evaluator': s.evaluator, 'evaluator_scope': 'continuation'},
      'notes': notes, 'checkpoints': records, 'models': models}
  eval_schema.validate_eval_json(result)
  if sharding.is_main_process():  # Every process computed the same.
    os.makedirs(os.path.join(workdir, 'samples'), exist_ok=True)
    for name, text in sample_files.items():
      files.atomic_write_text(os.path.join(workdir, name), text)
    files.atomic_write_text(
        os.path.join(workdir, 'eval.json'),
        json.dumps(result, indent=1, allow_nan=False) + '\n')
    for note in notes:  # Said, not only recorded in eval.json.
      if note not in said:
        _show(f'[eval] NOTE: {note}', flush=True)
    _note_other_samples(workdir,
                        {row['samples_file'] for row in models.values()})
  return result


class _Sweeper:
  """Noise sweeps of the plan's students (noise_sweep.py), one per run
  and readout.

  Contexts are held-out sequences cut at t >= prefix_len - 1 (seed
  eval.seed); the teacher's grids are swept once and shared.
  """

  def __init__(self, s: eval_settings.EvalSettings, teacher_cfg,
               teacher_params, seqs, loaded, notes: list[str]):
    self._s, self._seqs, self._loaded, self._notes = s, seqs, loaded, notes
    self._teacher = teacher_cfg, teacher_params
    self._u = noise_sweep.grid(s.sweep_grid)
    self._contexts = self._teacher_grids = None
    self._runs = {}

  def per_context(self, entry):
    # The sweep maps u to slot 1's token by the row's readout, without the
    # penalty, and not by sampling (noise_sweep.py says why).
    if (entry.kind != 'student' or entry.penalty > 0 or
        entry.readout == 'sample' or self._s.sweep_contexts == 0):
      return None
    key = entry.run, entry.readout, entry.temperature
    if key not in self._runs:
      if self._contexts is None:
        self._contexts = noise_sweep.pick_contexts(
            len(self._seqs), self._seqs.shape[1], self._s.prefix_len - 1,
            self._s.sweep_contexts, self._s.seed)
        _show(f'[eval] noise sweep: the teacher\'s map at '
              f'{len(self._contexts[0])} held-out contexts x '
              f'{self._s.sweep_grid} u, then each student\'s slot 1',
              flush=True)
        if len(self._contexts[0]) < self._s.sweep_contexts:
          self._notes.append(
              f'noise sweep: {len(self._contexts[0])} distinct contexts '
              f'(sequences x positions past the prefix), fewer '
              f'than eval.sweep_contexts={self._s.sweep_contexts}')
        self._teacher_grids = noise_sweep.teacher_grids(
            *self._teacher, self._seqs, *self._contexts, self._u)
      self._runs[key] = noise_sweep.sweep_student(
          *self._loaded[entry.run], self._seqs, *self._contexts, self._u,
          self._teacher_grids, entry.readout, entry.temperature)
    return self._runs[key]


def _note_other_samples(workdir: str, written: set[str]) -> None:
  """Names sample files an earlier evaluate left; never deletes results."""
  other = sorted(
      f'samples/{f}' for f in os.listdir(os.path.join(workdir, 'samples'))
      if f.endswith('.jsonl') and f'samples/{f}' not in written)
  if other:
    _show(f'[eval] NOTE: {", ".join(other)} in {workdir} are from an earlier '
          'evaluate and not in this eval.json (kept; delete them if unwanted)',
          flush=True)


def _fmt(stat) -> str:
  if stat is None or stat['mean'] is None:
    return 'n/a'
  return f"{stat['mean']:.3g} [{stat['lo']:.3g}, {stat['hi']:.3g}]"


def _print_progress(entry, row, num, max_new):
  m = row['metrics']
  dec = row['decode']
  speed = ('' if dec is None else
           f", {dec['tokens_per_s']:,.0f} tok/s" +
           (' (one batch: incl. compile)' if dec['includes_compile'] else ''))
  line = (f'[eval] {entry.name}: {num} x {max_new} tokens{speed}, '
          f"teacher ppl {_fmt(m['teacher_ppl'])}, entropy "
          f"{_fmt(m['entropy'])}")
  if m['evaluator_ppl'] is not None:
    line += f", evaluator ppl {_fmt(m['evaluator_ppl'])}"
  if row['coupling'] is not None:
    line += f", agreement {_fmt(row['coupling']['agreement'])}"
    if 'forced_agreement' in row['coupling']:
      line += (', teacher-forced '
               f"{_fmt(row['coupling']['forced_agreement'])}")
    sweep = row['coupling']['noise_sweep']
    if sweep is not None:
      line += (f"; noise sweep ({sweep['contexts']} contexts x "
               f"{sweep['grid']} u): slot-1 accuracy "
               f"{_fmt(sweep['accuracy'])}, distinct tokens "
               f"{_fmt(sweep['distinct_student'])} (teacher "
               f"{_fmt(sweep['distinct_teacher'])}), entropy "
               f"{_fmt(sweep['entropy_student'])} (teacher "
               f"{_fmt(sweep['entropy_teacher'])})")
  _show(line, flush=True)
