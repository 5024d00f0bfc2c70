"""Tests of kforcing_jax.evaluator_train: the offline independent evaluator
(torch GPT-2 shape + own BPE), its config checks, resume and determinism,
and its wiring into the CLI and the pipeline."""

import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

pytest.importorskip('torch')
pytest.importorskip('transformers')

# pylint: disable=g-import-not-at-top,wrong-import-position
from kforcing_jax import commands
from kforcing_jax import defaults
from kforcing_jax import eval_settings
from kforcing_jax import evaluate as ev
from kforcing_jax import evaluator_train as et
from kforcing_jax import hf_evaluator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SENTENCE = 'the quick brown fox jumps over the lazy dog and runs home. '


def _config(docs_dir, **overrides):
  """A text corpus config with a tiny, fast evaluator."""
  c = defaults.base_config()
  c.data.update(dict(source='text', text_glob=str(docs_dir / '*.txt')))
  c.evaluator_train.update(dict(
      vocab_size=300, seq_len=32, num_layers=1, d_model=32, num_heads=2,
      batch_size=4, num_steps=100, lr=1e-2, warmup_steps=5, eval_batches=2,
      log_every=1, num_threads=1, dropout=0.1))
  c.evaluator_train.update(overrides)
  return c


@pytest.fixture(scope='module')
def docs(tmp_path_factory):
  """11 documents of one repeated sentence: document 10 is validation."""
  folder = tmp_path_factory.mktemp('docs')
  for i in range(11):
    (folder / f'{i:02d}.txt').write_text(_SENTENCE * (20 + i))
  return folder


@pytest.fixture(scope='module')
def trained(docs, tmp_path_factory):
  """(config, workdir, out dir) of one tiny training run."""
  workdir = str(tmp_path_factory.mktemp('w'))
  config = _config(docs)
  return config, workdir, et.train_evaluator(config, workdir)


def _info(out):
  with open(os.path.join(out, et.INFO_FILE)) as f:
    return json.load(f)


def _losses(out):
  with open(os.path.join(out, et.METRICS_FILE)) as f:
    return [json.loads(line)['loss'] for line in f]


def test_saved_dir_loads_as_the_evaluator(trained):
  config, workdir, out = trained
  assert out == os.path.join(workdir, 'evaluator')
  info = _info(out)
  assert info['steps'] == 100 and info['params'] > 0
  assert np.isfinite(info['heldout_ppl']) and info['seconds'] > 0
  config = config.copy_and_resolve_references()
  config.eval.evaluator = out
  evaluator = hf_evaluator.load_evaluator(
      eval_settings.settings_from_config(config))
  assert evaluator.tokenizer.eos_token == et.EOS
  assert evaluator.max_len == 32
  texts = ['the quick brown fox jumps', 'over the lazy dog and runs home.']
  nll, count, cut = evaluator.nll(['the quick', 'over the'], texts)
  assert np.all(count > 0) and np.all(np.isfinite(nll)) and not cut.any()
  # Byte-level BPE: any text round-trips, nothing is unknown.
  odd = 'Zürich 42 ✓ \n tabs\t'
  assert evaluator.tokenizer.decode(evaluator.tokenizer(odd)['input_ids']
                                    ) == odd


def test_training_lowers_the_loss(trained):
  _, _, out = trained
  info, losses = _info(out), _losses(out)
  assert len(losses) == 100
  # Repeated text: far below both the first batch and a uniform guess.
  assert np.mean(losses[-5:]) < 0.5 * losses[0]
  assert info['heldout_ppl'] < 0.2 * info['init_heldout_ppl']
  assert info['heldout_ppl'] < 2  # The sentence is learnt by heart.


def test_each_logged_lr_is_the_one_its_step_used(trained):
  # The row of step n showed step n+1's rate (the scheduler had moved on).
  config, _, out = trained
  s = config.evaluator_train
  with open(os.path.join(out, et.METRICS_FILE)) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows] == list(range(1, 101))
  np.testing.assert_allclose(
      [r['lr'] for r in rows],
      [s.lr * et.lr_factor(n - 1, s.warmup_steps, s.num_steps)
       for n in range(1, 101)], rtol=1e-12)
  assert rows[0]['lr'] == pytest.approx(s.lr / s.warmup_steps)


def test_rerun_skips(trained, monkeypatch, capsys):
  config, workdir, out = trained
  before = os.path.getmtime(os.path.join(out, et.INFO_FILE))
  monkeypatch.setattr(et, '_train_loop', _must_not_run)
  assert et.train_evaluator(config, workdir) == out
  assert 'skipped training' in capsys.readouterr().out
  assert os.path.getmtime(os.path.join(out, et.INFO_FILE)) == before
  # Another held-out measurement size is no reason to retrain: no note.
  measured = config.copy_and_resolve_references()
  measured.evaluator_train.eval_batches = 5
  et.train_evaluator(measured, workdir)
  assert 'retrain' not in capsys.readouterr().out
  # Other settings: still skipped, with a note saying how to retrain.
  changed = config.copy_and_resolve_references()
  changed.evaluator_train.num_steps = 7
  et.train_evaluator(changed, workdir)
  assert f'delete {out} to retrain' in capsys.readouterr().out


def test_another_process_saving_first_is_not_an_error(
    trained, docs, tmp_path, monkeypatch):
  # Every process of a multi-process run trains the same evaluator; the
  # later one to save finds the folder complete and keeps it.
  _, _, done = trained
  save = et._save

  def other_process_first(out, *args):
    shutil.copytree(done, out, dirs_exist_ok=True)
    save(out, *args)

  monkeypatch.setattr(et, '_save', other_process_first)
  out = et.train_evaluator(_config(docs, num_steps=3), str(tmp_path))
  assert _info(out) == _info(done)
  assert os.listdir(tmp_path) == ['evaluator']  # No temp folder left.


def test_another_process_removing_the_empty_folder_first(
    docs, tmp_path, monkeypatch):
  # Between this process's check and its rmdir, another one removed the
  # empty folder (and has not renamed its own yet).
  out = str(tmp_path / 'evaluator')
  rmdir = os.rmdir

  def raced(path, *args, **kwargs):
    rmdir(path, *args, **kwargs)
    if os.path.abspath(path) == out:
      raise FileNotFoundError(path)

  monkeypatch.setattr(et.os, 'rmdir', raced)
  os.makedirs(out)
  assert et.train_evaluator(_config(docs, num_steps=3), str(tmp_path)) == out
  assert et.is_complete(out)


def _must_not_run(*args, **kwargs):
  raise AssertionError('trained although it should not have')


def test_same_seed_gives_identical_loss_streams(trained, docs, tmp_path):
  config, _, out = trained
  import torch  # pylint: disable=g-import-not-at-top
  before = torch.get_num_threads()
  torch.set_num_threads(3)  # The caller's count: trained on 1, given back.
  try:
    again = et.train_evaluator(config, str(tmp_path))
    assert torch.get_num_threads() == 3
  finally:
    torch.set_num_threads(before)
  assert _losses(again) == _losses(out)
  assert _info(again)['heldout_ppl'] == _info(out)['heldout_ppl']
  other = et.train_evaluator(_config(docs, seed=5), str(tmp_path / 'b'))
  assert _losses(other) != _losses(out)


@pytest.mark.parametrize('field,value,needle', [
    ('vocab_size', 100, 'evaluator_train.vocab_size=100'),
    ('seq_len', 1, 'evaluator_train.seq_len=1'),
    ('num_layers', 0, 'evaluator_train.num_layers=0'),
    ('num_heads', 3, 'evaluator_train.num_heads=3 must divide d_model=32'),
    ('dropout', 1.0, 'evaluator_train.dropout=1.0'),
    ('lr', 0.0, 'evaluator_train.lr=0.0'),
    ('num_steps', 0, 'evaluator_train.num_steps=0'),
    ('num_threads', -1, 'evaluator_train.num_threads=-1'),
])
def test_bad_values_fail_before_training(docs, tmp_path, monkeypatch, field,
                                         value, needle):
  monkeypatch.setattr(et.documents, 'raw_texts', _must_not_run)
  config = _config(docs, **{field: value})
  with pytest.raises(ValueError, match=needle):
    et.train_evaluator(config, str(tmp_path))
  with pytest.raises(ValueError, match=needle):  # Every command checks it.
    defaults.validate(config)
  assert not os.listdir(tmp_path)


def test_unfinished_folder_in_the_way_is_kept(docs, tmp_path, monkeypatch):
  monkeypatch.setattr(et.documents, 'raw_texts', _must_not_run)
  (tmp_path / 'evaluator').mkdir()
  (tmp_path / 'evaluator' / 'notes.txt').write_text('mine')
  with pytest.raises(ValueError, match='not a finished evaluator'):
    et.train_evaluator(_config(docs), str(tmp_path))
  assert (tmp_path / 'evaluator' / 'notes.txt').read_text() == 'mine'


def test_empty_heldout_split_is_named(tmp_path):
  for i in range(5):  # Document 10 would be the first validation one.
    (tmp_path / f'{i:02d}.txt').write_text(_SENTENCE * 20)
  with pytest.raises(ValueError, match="data.eval_split='validation' has "
                     r'no documents: .* matches 5 file\(s\)'):
    et.train_evaluator(_config(tmp_path), str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_missing_torch_names_the_extra(docs, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(ImportError, match=r"kforcing_jax\[eval\]"):
    et.train_evaluator(_config(docs), str(tmp_path))


def test_a_held_out_split_that_is_the_training_split_is_noted(
    docs, tmp_path, monkeypatch, capsys):
  # Its held-out perplexity would be on training text; said before any
  # work (the missing torch stops the run right after the checks).
  monkeypatch.setitem(sys.modules, 'torch', None)
  config = _config(docs)
  config.data.eval_split = 'train'
  with pytest.raises(ImportError):
    et.train_evaluator(config, str(tmp_path))
  assert capsys.readouterr().out == (
      "[evaluator] NOTE: data.eval_split='train' is data.train_split: its "
      'numbers are measured on training text, not held out\n')


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
  assert et.lr_factor(0, 4, 40) == pytest.approx(0.25)
  assert et.lr_factor(3, 4, 40) == pytest.approx(1.0)
  assert et.lr_factor(40, 4, 40) == pytest.approx(0.1)
  assert et.lr_factor(0, 0, 10) == pytest.approx(1.0)


def test_batches_visit_every_window_once_per_epoch():
  idx = et.batch_indices(10, 4, 5, seed=0)
  assert idx.shape == (5, 4)
  assert sorted(idx.reshape(-1)[:10]) == list(range(10))
  assert np.array_equal(idx, et.batch_indices(10, 4, 5, seed=0))



def test_an_evaluator_worse_on_held_out_text_than_at_init_is_flagged(
    trained, tmp_path, capsys):
  # configs/tiny.py with the base recipe (86 epochs of 186 windows) ended
  # at held-out ppl 152480 against 4203 at init, without a word, and every
  # later run said only "complete ... skipped training".
  info = {'heldout_ppl': 152479.7, 'init_heldout_ppl': 4203.4, 'steps': 1000,
          'train_windows': 186, 'recipe': {'batch_size': 16}}
  assert et.overfit_warning(info) == (
      'WARNING: held-out ppl 152479.7 is above its 4203.4 at '
      'init: it overfit the train split, 86 epochs of its 186 train '
      'windows. Its scores say little; train it with fewer '
      'evaluator_train.num_steps or on more data')
  assert et.overfit_warning(dict(info, heldout_ppl=4000.0)) is None
  # Said again whenever the saved one is found.
  config, _, out = trained
  shutil.copytree(out, tmp_path / 'evaluator')
  with open(tmp_path / 'evaluator' / et.INFO_FILE) as f:
    saved = json.load(f)
  saved['heldout_ppl'] = saved['init_heldout_ppl'] * 2
  with open(tmp_path / 'evaluator' / et.INFO_FILE, 'w') as f:
    json.dump(saved, f)
  capsys.readouterr()
  et.train_evaluator(config, str(tmp_path))
  assert '[evaluator] WARNING: held-out ppl' in capsys.readouterr().out


def test_default_threads_are_the_cores_this_process_may_use(monkeypatch):
  # A container or taskset can leave fewer cores than the machine has.
  monkeypatch.setattr(os, 'sched_getaffinity', lambda _: {0, 1, 2},
                      raising=False)
  monkeypatch.setattr(os, 'cpu_count', lambda: 64)
  config = defaults.base_config()
  assert et.thread_count(et.evaluator_settings(config)) == 3
  config.evaluator_train.num_threads = 5
  assert et.thread_count(et.evaluator_settings(config)) == 5


# --------------------------------------------------------------------------
# Wiring: CLI and pipeline.
# --------------------------------------------------------------------------


def test_cli_train_evaluator_rejects_a_bad_value(tmp_path):
  r = subprocess.run(
      [sys.executable, '-m', 'kforcing_jax', 'train-evaluator',
       '--config=configs/tiny.py', f'--workdir={tmp_path}',
       '--config.evaluator_train.d_model=30'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr
  assert 'evaluator_train.num_heads=4 must divide d_model=30' in r.stderr
  assert not (tmp_path / 'evaluator').exists()


def _fake_stages(monkeypatch, calls):
  from kforcing_jax import bench
  from kforcing_jax import pipeline
  from kforcing_jax import report
  done = types.SimpleNamespace(seconds=0, tokens_per_s=0, preempted=False)
  monkeypatch.setattr(commands, 'run_teacher', lambda c, w, **_: done)
  monkeypatch.setattr(commands, 'run_distill',
                      lambda c, w, on_result=None: [])
  monkeypatch.setattr(ev, 'run_evaluate', lambda c, w: calls.append(
      ('evaluate', c.eval.evaluator)))
  monkeypatch.setattr(bench, 'run_bench', lambda c, w: None)
  monkeypatch.setattr(report, 'write_report', lambda w: 'report.md')
  monkeypatch.setattr(et, 'train_evaluator', lambda c, w: calls.append(
      ('train', w)) or os.path.join(w, 'evaluator'))
  # The given folder is a stand-in, not a loadable model: the up-front check
  # (tested in test_evaluate.py) is recorded instead.
  monkeypatch.setattr(hf_evaluator, 'check_evaluator',
                      lambda path: calls.append(('check', path)))
  return pipeline


@pytest.mark.parametrize('enabled,given,want', [
    (True, '', 'W/evaluator'),  # Trained, then used by evaluate.
    (True, 'G', 'G'),  # An evaluator was given: not trained.
    (False, '', ''),
])
def test_pipeline_trains_the_evaluator_only_when_asked(
    tmp_path, monkeypatch, enabled, given, want):
  calls = []
  pipeline = _fake_stages(monkeypatch, calls)
  config = defaults.base_config()
  config.evaluator_train.enabled = enabled
  if given == 'G':  # A save_pretrained folder outside the workdir.
    folder = tmp_path / 'given_gpt2'
    folder.mkdir()
    (folder / 'config.json').write_text('{}')
    given = want = str(folder)
  config.eval.evaluator = given
  workdir = str(tmp_path / 'W')
  pipeline.run_pipeline(config, workdir)
  want = want.replace('W', workdir) if want == 'W/evaluator' else want
  trained = [('train', workdir)] if want.startswith(workdir) else []
  checked = [('check', given)] if given else []
  assert calls == checked + trained + [('evaluate', want)]
  assert config.eval.evaluator == given  # The caller's config is untouched.


def test_pipeline_without_torch_evaluates_without_an_evaluator(
    tmp_path, monkeypatch, capsys):
  calls = []
  pipeline = _fake_stages(monkeypatch, calls)
  monkeypatch.setitem(sys.modules, 'torch', None)
  config = defaults.base_config()
  config.evaluator_train.enabled = True
  pipeline.run_pipeline(config, str(tmp_path))
  assert calls == [('evaluate', '')]
  assert "[evaluator] skipped: evaluator_train.enabled, which needs" in (
      capsys.readouterr().out)


def test_report_names_the_trained_evaluator(trained):
  from kforcing_jax import report
  _, _, out = trained
  lines = report._evaluator_lines(out)  # pylint: disable=protected-access
  assert 'trained by train-evaluator on the train split' in lines[0]
  assert 'not in data' in lines[0]
  assert not any('WARNING' in line for line in lines)
  assert report._evaluator_lines('') == []  # pylint: disable=protected-access


def test_report_flags_an_evaluator_worse_than_at_init(trained, tmp_path):
  from kforcing_jax import report
  _, _, out = trained
  shutil.copytree(out, tmp_path / 'evaluator')
  info = _info(out)
  info['heldout_ppl'] = info['init_heldout_ppl'] * 2
  with open(tmp_path / 'evaluator' / et.INFO_FILE, 'w') as f:
    json.dump(info, f)
  lines = report._evaluator_lines(  # pylint: disable=protected-access
      str(tmp_path / 'evaluator'))
  assert lines[2].startswith('**WARNING: held-out ppl ')
  assert lines[2].endswith('or on more data**')


def test_base_config_is_disabled_and_demo_enabled():
  from configs import demo, tiny
  assert not defaults.base_config().evaluator_train.enabled
  assert not tiny.get_config().evaluator_train.enabled
  demo_config = demo.get_config()
  assert demo_config.evaluator_train.enabled
  defaults.validate(demo_config)


def test_other_data_than_the_workdirs_is_refused_before_training(docs,
                                                                 tmp_path):
  # Run without the teacher's data flags, it trained on the demo corpus.
  (tmp_path / 'data.json').write_text(json.dumps(
      {'source': 'sotu', 'train_split': 'train', 'max_documents': 0}))
  with pytest.raises(ValueError, match="data.source was 'sotu', now 'text'"):
    et.train_evaluator(_config(docs), str(tmp_path))
  assert not os.path.exists(tmp_path / 'evaluator')


def test_a_shared_evaluator_trained_on_other_data_is_refused(
    trained, tmp_path, monkeypatch):
  # An evaluator_train.dir shared between workdirs was reused whatever
  # corpus it had been trained on.
  config, _, out = trained
  assert _info(out)['data']['source'] == 'text'
  other_docs = tmp_path / 'other_docs'
  other_docs.mkdir()
  for i in range(3):
    (other_docs / f'{i:02d}.txt').write_text('another corpus. ' * (30 + i))
  shared = _config(other_docs, dir=out)
  monkeypatch.setattr(et, '_train_loop', _must_not_run)
  workdir = tmp_path / 'W'
  with pytest.raises(ValueError, match=r'trained on other data: the files '
                     r'data.text_glob matches: 8 removed .*eval.evaluator'):
    et.train_evaluator(shared, str(workdir))
  # The pipeline refuses it in its up-front checks, before any training.
  from kforcing_jax import pipeline
  shared.evaluator_train.enabled = True
  check_plan = pipeline._check_plan  # pylint: disable=protected-access
  with pytest.raises(ValueError, match='trained on other data'):
    check_plan(shared, str(workdir))
  # The same data in another workdir is fine: the shared folder is reused.
  reused = config.copy_and_resolve_references()
  reused.evaluator_train.dir = out
  reused.evaluator_train.enabled = True
  check_plan(reused, str(workdir))
  assert et.train_evaluator(reused, str(workdir)) == out
  # A folder from before the data was recorded is not checked.
  old = tmp_path / 'old_evaluator'
  shutil.copytree(out, old)
  info = _info(str(old))
  del info['data']
  (old / et.INFO_FILE).write_text(json.dumps(info))
  assert et.train_evaluator(_config(other_docs, dir=str(old)),
                            str(workdir)) == str(old)
