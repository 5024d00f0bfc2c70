"""Tests of kforcing_jax.evaluate: metrics by hand, bootstrap, HF evaluator,
fixed-length decoding, eval.json schema and an end-to-end run."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kforcing_jax import decode
from kforcing_jax import defaults
from kforcing_jax import eval_metrics
from kforcing_jax import eval_schema
from kforcing_jax import eval_settings
from kforcing_jax import evaluate as ev
from kforcing_jax import hf_evaluator
from kforcing_jax import model as model_lib
from kforcing_jax import report
from kforcing_jax import token_stats
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SETTINGS = eval_settings.settings_from_config(ml_collections.ConfigDict())


# --------------------------------------------------------------------------
# Text statistics against hand-computed values.
# --------------------------------------------------------------------------


def test_unigram_entropy_hand_values():
  assert token_stats.unigram_entropy([0, 0, 1, 1]) == pytest.approx(math.log(2))
  assert token_stats.unigram_entropy([5, 5, 5]) == 0.0
  assert math.copysign(1, token_stats.unigram_entropy([5])) == 1  # Not -0.0.
  assert token_stats.unigram_entropy([3, 1, 2, 0]) == pytest.approx(math.log(4))
  # p = (1/2, 1/4, 1/4): H = 1.5 ln 2.
  assert token_stats.unigram_entropy([7, 7, 8, 9]) == pytest.approx(1.5 * math.log(2))
  assert math.isnan(token_stats.unigram_entropy([]))


def test_distinct_n_hand_values():
  t = [1, 2, 1, 2]
  assert eval_metrics.distinct_n(t, 1) == pytest.approx(2 / 4)
  assert eval_metrics.distinct_n(t, 2) == pytest.approx(2 / 3)  # 12, 21, 12.
  assert eval_metrics.distinct_n(t, 3) == pytest.approx(1.0)  # 121, 212.
  assert eval_metrics.distinct_n(t, 4) == pytest.approx(1.0)
  assert math.isnan(eval_metrics.distinct_n(t, 5))


def test_repetition_rate_hand_values():
  # The 4-gram 1234 recurs at position 4 and covers tokens 4..7.
  rate = eval_metrics.repetition_rate
  assert rate([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(0.5)
  assert rate([1, 2, 3, 4, 5, 6]) == 0.0
  # Eight equal tokens: 4-grams at 1..4 repeat the one at 0 -> tokens 1..7.
  assert rate([9] * 8) == pytest.approx(7 / 8)
  assert math.isnan(rate([1, 2, 3]))  # No 4-gram: undefined, as distinct_4.


def test_text_stats_rows_and_keys():
  stats = eval_metrics.text_stats(np.array([[0, 0, 1, 1], [5, 5, 5, 5]]))
  assert set(stats) == {'entropy', 'distinct_1', 'distinct_2', 'distinct_3',
                        'distinct_4', 'repetition_4'}
  np.testing.assert_allclose(stats['entropy'], [math.log(2), 0.0])
  np.testing.assert_allclose(stats['distinct_1'], [0.5, 0.25])


def test_coupling_stats_hand_values():
  teacher = np.array([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]])
  student = np.array([[1, 2, 9, 4, 5], [1, 2, 3, 4, 5]])
  c = eval_metrics.coupling_stats(student, teacher, k=2)
  np.testing.assert_allclose(c['agreement'], [0.8, 1.0])
  # Slot 0: positions 0, 2, 4; slot 1: positions 1, 3.
  np.testing.assert_allclose(c['per_slot'], [[2 / 3, 1.0], [1.0, 1.0]])
  np.testing.assert_allclose(c['first_divergence'], [2, 5])
  with pytest.raises(ValueError, match='student tokens'):
    eval_metrics.coupling_stats(student[:, :4], teacher, k=2)
  # Against forced tokens: every position, whatever came before it.
  forced = np.array([[7, 2, 9, 4, 7], [1, 2, 3, 4, 5]])
  c = eval_metrics.coupling_stats(student, teacher, 2, forced_NxT=forced)
  np.testing.assert_allclose(c['forced_agreement'], [0.6, 1.0])
  np.testing.assert_allclose(c['forced_per_slot'], [[1 / 3, 1.0], [1.0, 1.0]])
  with pytest.raises(ValueError, match='forced'):
    eval_metrics.coupling_stats(student, teacher, 2, forced_NxT=forced[:1])


def test_forced_ceiling_note_only_when_the_teacher_is_not_reproduced():
  rollout = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
  assert ev.forced_ceiling_note(rollout, rollout, 'float32') is None
  off = rollout.copy()
  off[1, 3] = 0
  note = ev.forced_ceiling_note(off, rollout, 'bfloat16')
  assert 'agrees on 0.8750 of its tokens (1 of 8 differ' in note
  assert 'bfloat16' in note


def test_teacher_forced_tokens_reproduce_the_teachers_own_rollout():
  # Forced on its own rollout, the teacher emits that rollout again: the
  # same inverse CDF of the same u, the full forward in place of the cache.
  cfg = model_lib.ModelConfig(vocab_size=23, seq_len=16, num_layers=1,
                              d_model=16, num_heads=2, mlp_dim=32)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(2))
  prefixes = np.array([[3, 4, 5], [7, 1, 2], [9, 9, 9]], np.int32)
  noise = np.asarray(jax.random.uniform(jax.random.PRNGKey(3), (3, 13)))
  rollout = ev.generate_fixed(cfg, params, prefixes, noise, k=1)
  fn = eval_metrics.teacher_scores_fn(cfg, params)
  full = np.concatenate([prefixes, rollout], axis=1)
  # batch_size=2 also exercises the padded last batch.
  _, forced = eval_metrics.batched(fn, (full, noise), batch_size=2)
  np.testing.assert_array_equal(forced, rollout)
  # Another context or other noise gives other tokens: the check has teeth.
  _, shifted = eval_metrics.batched(fn, (full, np.roll(noise, 1, 1)), 2)
  assert (shifted != rollout).mean() > 0.3


# --------------------------------------------------------------------------
# Perplexity with analytic log-prob functions.
# --------------------------------------------------------------------------

# A fixed 3-token bigram teacher: P[prev, next].
_BIGRAM = np.array([[0.5, 0.25, 0.25],
                    [0.1, 0.2, 0.7],
                    [0.6, 0.3, 0.1]])


def _bigram_logprob_fn(tokens):
  tokens = np.asarray(tokens)
  return np.log(_BIGRAM[tokens[:, :-1], tokens[:, 1:]])


def test_nll_bigram_hand_values():
  tokens = np.array([[0, 1, 2, 1], [2, 0, 0, 1], [1, 1, 1, 1]])
  # batch_size=2 also exercises the padded last batch.
  lp = eval_metrics.batched(_bigram_logprob_fn, (tokens,), batch_size=2)
  nll, count = eval_metrics.nll_from_logprobs(lp, start=2)
  want = -np.log([0.7 * 0.3, 0.5 * 0.25, 0.2 * 0.2])
  np.testing.assert_allclose(nll, want)
  np.testing.assert_array_equal(count, [2, 2, 2])
  ppl = eval_metrics.perplexity_ci(nll, count, _SETTINGS)
  assert ppl['mean'] == pytest.approx(math.exp(want.sum() / 6))
  with pytest.raises(ValueError, match='start=0'):
    eval_metrics.nll_from_logprobs(lp, start=0)
  with pytest.raises(ValueError, match='start=4'):
    eval_metrics.nll_from_logprobs(lp, start=4)
  with pytest.raises(ValueError, match=r'\[3, 2\]'):
    eval_metrics.batched(lambda a, b: a, (tokens, tokens[:2]), 2)


def test_uniform_model_has_perplexity_vocab_size():
  uniform = lambda t: np.full((t.shape[0], t.shape[1] - 1), -math.log(4))
  tokens = np.random.default_rng(0).integers(0, 4, (5, 10))
  ppl = eval_metrics.perplexity_ci(
      *eval_metrics.nll_from_logprobs(
          eval_metrics.batched(uniform, (tokens,), 4), 6), _SETTINGS)
  assert ppl['mean'] == pytest.approx(4.0)
  assert ppl['lo'] == pytest.approx(4.0) and ppl['hi'] == pytest.approx(4.0)


def test_perplexity_is_token_weighted():
  # Per-token NLL 2 over 1 token and 2 over 3 tokens -> exp(8 / 4).
  ppl = eval_metrics.perplexity_ci([2.0, 6.0], [1, 3], _SETTINGS)
  assert ppl['mean'] == pytest.approx(math.exp(2.0))
  # A sample with no scored tokens is dropped, not a division by zero.
  ppl = eval_metrics.perplexity_ci([2.0, 0.0], [1, 0], _SETTINGS)
  assert ppl['n'] == 1 and ppl['mean'] == pytest.approx(math.exp(2.0))


def test_teacher_scores_log_probs_match_full_forward(small_cfg):
  params = model_lib.init_params(small_cfg, jax.random.PRNGKey(0))
  tokens = np.random.default_rng(1).integers(0, small_cfg.vocab_size, (3, 9))
  noise = np.full((3, 4), 0.5, np.float32)
  got, _ = eval_metrics.teacher_scores_fn(small_cfg, params)(tokens, noise)
  got = np.asarray(got)
  logits = model_lib.Transformer(small_cfg).apply({'params': params},
                                                  jnp.asarray(tokens))
  lp = np.asarray(jax.nn.log_softmax(logits, -1))
  want = np.take_along_axis(lp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# Bootstrap.
# --------------------------------------------------------------------------


def test_bootstrap_contains_mean_and_shrinks_with_data():
  rng = np.random.default_rng(0)
  small = eval_metrics.bootstrap_ci(rng.normal(size=30), num_resamples=500)
  large = eval_metrics.bootstrap_ci(rng.normal(size=3000), num_resamples=500)
  for ci in (small, large):
    assert ci['lo'] < ci['mean'] < ci['hi']
  assert large['hi'] - large['lo'] < 0.3 * (small['hi'] - small['lo'])
  assert small['n'] == 30


def test_bootstrap_width_matches_normal_theory():
  # Mean of 400 standard normals: 95% CI half-width ~ 1.96 / sqrt(400).
  values = np.random.default_rng(2).normal(size=400)
  ci = eval_metrics.bootstrap_ci(values, num_resamples=2000)
  assert (ci['hi'] - ci['lo']) / 2 == pytest.approx(1.96 / 20, rel=0.15)
  narrow = eval_metrics.bootstrap_ci(values, num_resamples=2000, level=0.5)
  assert (narrow['hi'] - narrow['lo']) / 2 == pytest.approx(0.674 / 20,
                                                             rel=0.15)


def test_bootstrap_is_deterministic_by_seed():
  values = np.random.default_rng(1).exponential(size=200)
  a = eval_metrics.bootstrap_ci(values, seed=3)
  assert a == eval_metrics.bootstrap_ci(values, seed=3)
  b = eval_metrics.bootstrap_ci(values, seed=4)
  assert a['mean'] == b['mean'] and (a['lo'], a['hi']) != (b['lo'], b['hi'])


def test_bootstrap_edge_cases():
  assert eval_metrics.bootstrap_ci([]) == {'mean': None, 'lo': None, 'hi': None,
                                 'n': 0}
  assert eval_metrics.bootstrap_ci([2.0]) == {'mean': 2.0, 'lo': 2.0, 'hi': 2.0,
                                    'n': 1}
  ci = eval_metrics.bootstrap_ci([1.0, float('nan'), 3.0], num_resamples=0)
  assert ci == {'mean': 2.0, 'lo': 2.0, 'hi': 2.0, 'n': 2}
  # Weighted, transformed statistic: exp((1*1 + 3*3) / 4).
  ci = eval_metrics.bootstrap_ci([1.0, 3.0], [1, 3], transform=np.exp)
  assert ci['mean'] == pytest.approx(math.exp(2.5))
  assert math.exp(1.0) <= ci['lo'] <= ci['hi'] <= math.exp(3.0)


# --------------------------------------------------------------------------
# Settings and the model plan.
# --------------------------------------------------------------------------


def test_settings_defaults_and_overrides():
  assert _SETTINGS.prefix_len == 6 and _SETTINGS.evaluator == ''
  assert _SETTINGS.penalty(4) == 0.5 and _SETTINGS.penalty(1) == 0.0
  config = ml_collections.ConfigDict({'eval': {
      'num_samples': 3, 'penalties': {'k2': 0.3, '3': 0.1}}})
  s = eval_settings.settings_from_config(config)
  assert s.num_samples == 3 and s.penalties == ((2, 0.3), (3, 0.1))
  s = eval_settings.settings_from_config({'eval': {'penalties': {4: 0.5}}})
  assert s.penalty(4) == 0.5
  for bad, needle in (({'prefix_len': 0}, 'eval.prefix_len=0'),
                      ({'penalties': {'x': 1.0}}, "key 'x'"),
                      ({'ci_level': 1.5}, 'eval.ci_level'),
                      ({'sample_temperature': -1.0},
                       r'eval.sample_temperature=-1.0 must be 0 \(no '
                       r'sampled-readout rows\) or finite in float32 and '
                       '>= 1e-30'),
                      ({'median_temperature': float('nan')},
                       r'eval.median_temperature=nan must be 0 \(no '
                       r'median-readout rows\)')):
    with pytest.raises(ValueError, match=needle):
      eval_settings.settings_from_config(
          ml_collections.ConfigDict({'eval': bad}))
  # A lambda whose lambda x count overflows float32 at model.seq_len is
  # refused up front (the pipeline checks this before training), not by
  # generate after the students are trained.
  with pytest.raises(ValueError, match=r"eval.penalties\['k4'\]=1e\+37: "
                     r'at most 3.54e\+36'):
    eval_settings.settings_from_config(ml_collections.ConfigDict(
        {'model': {'seq_len': 48}, 'eval': {'penalties': {'k4': 1e37}}}))


def test_plan_models_picks_smallest_window():
  plan = ev.plan_models([1, 2, 4], _SETTINGS)
  names = [e.name for e in plan]
  assert names == ['data', 'teacher', 'student_k1', 'student_k2',
                   'student_k2_penalty', 'student_k3', 'student_k3_penalty',
                   'student_k4', 'student_k4_penalty']
  by_name = {e.name: e for e in plan}
  assert by_name['student_k3'].run == 'student_k4'
  assert by_name['student_k3_penalty'].penalty == 0.4
  assert by_name['student_k2'].run == 'student_k2'
  assert [e.name for e in ev.plan_models([], _SETTINGS)] == ['data',
                                                              'teacher']
  s = dataclasses.replace(_SETTINGS, ks=(8,))
  with pytest.raises(ValueError, match='k=8'):
    ev.plan_models([1, 2, 4], s)
  # eval.sample_temperature: a sampled-readout row after each k's others.
  s = dataclasses.replace(_SETTINGS, ks=(1, 2), sample_temperature=0.8)
  plan = ev.plan_models([1, 2], s)
  assert [e.name for e in plan][2:] == [
      'student_k1', 'student_k1_sample', 'student_k2', 'student_k2_penalty',
      'student_k2_sample', 'student_k2_penalty_sample']
  sampled, both = plan[-2:]
  assert (sampled.run, sampled.k, sampled.penalty, sampled.readout,
          sampled.temperature) == ('student_k2', 2, 0.0, 'sample', 0.8)
  assert (both.run, both.k, both.penalty, both.readout,
          both.temperature) == ('student_k2', 2, 0.2, 'sample', 0.8)
  assert {e.readout for e in plan if 'sample' not in e.name} == {'argmax'}
  # eval.median_temperature: median-readout rows after the sampled ones.
  s = dataclasses.replace(s, ks=(2,), median_temperature=0.7)
  plan = ev.plan_models([1, 2], s)
  assert [e.name for e in plan][2:] == [
      'student_k2', 'student_k2_penalty', 'student_k2_sample',
      'student_k2_penalty_sample', 'student_k2_median',
      'student_k2_penalty_median']
  assert [(e.readout, e.temperature, e.penalty) for e in plan[-2:]] == [
      ('median', 0.7, 0.0), ('median', 0.7, 0.2)]


# --------------------------------------------------------------------------
# Fixed-length decoding when k does not divide the length.
# --------------------------------------------------------------------------


def test_generate_fixed_equals_a_longer_decode_cut_short():
  cfg = model_lib.ModelConfig(vocab_size=23, seq_len=12, num_layers=1,
                              d_model=16, num_heads=2, mlp_dim=32,
                              noise_window=4)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  prefixes = np.array([[3, 4, 5], [7, 1, 2]], np.int32)
  noise = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (2, 9)))
  # k=3 over 9 tokens fits; over 8 it needs a 2-token last pass. A model
  # with room for 9 decodes the same first 8 tokens.
  got = ev.generate_fixed(cfg, params, prefixes, noise[:, :8], k=3,
                          penalty=0.5)
  want = decode.generate(params, cfg, prefixes, max_new_tokens=9, k=3,
                         noise=noise, frequency_penalty=0.5).tokens
  assert got.shape == (2, 8)
  np.testing.assert_array_equal(got, want[:, :8])


# --------------------------------------------------------------------------
# Independent HF evaluator (tiny random GPT-2, built offline).
# --------------------------------------------------------------------------

_WORDS = ('the cat sat on a mat while dogs ran far away from home and birds '
          'sang songs of old days in green fields under blue skies').split()


def _corpus(num_docs, words_per_doc, seed=0):
  rng = np.random.default_rng(seed)
  return [' '.join(rng.choice(_WORDS, words_per_doc)) + '.'
          for _ in range(num_docs)]


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  """A saved tiny GPT-2 + BPE tokenizer; also `tokenizer.json` for data."""
  with pytest.MonkeyPatch.context() as mp:
    # The evaluator must never reach a hub: everything here is local.
    mp.setenv('HF_HUB_OFFLINE', '1')
    mp.setenv('TRANSFORMERS_OFFLINE', '1')
    yield _save_tiny_gpt2(tmp_path_factory.mktemp('hf'))


def _save_tiny_gpt2(out):
  pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  import tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
      add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<|endoftext|>', '[PAD]'],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_corpus(50, 40), trainer)
  tok.save(str(out / 'tokenizer.json'))
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token='<|endoftext|>', pad_token='[PAD]')
  fast.save_pretrained(str(out))
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      n_layer=1, n_embd=32, n_head=2, n_positions=64,
      vocab_size=tok.get_vocab_size()))
  model.save_pretrained(str(out))
  return str(out)


@pytest.mark.parametrize('remove, needle', [
    # Used to load an empty tokenizer (transformers 5): every evaluator
    # perplexity n/a, exit 0, no note.
    (('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'),
     'its tokenizer makes no tokens of text'),
    (('model.safetensors',), 'has no model weights'),
])
def test_evaluator_folder_missing_a_part_is_named_before_loading(
    hf_dir, tmp_path, remove, needle):
  folder = tmp_path / 'hf'
  shutil.copytree(hf_dir, folder)
  for name in remove:
    if (folder / name).exists():
      (folder / name).unlink()
  with pytest.raises(ValueError, match=f"eval.evaluator='{folder}'.*{needle}"):
    hf_evaluator.check_evaluator(str(folder))
  hf_evaluator.check_evaluator(hf_dir)  # The whole folder passes.


def test_evaluator_whose_tokenizer_does_not_load_is_named(hf_dir, tmp_path):
  folder = tmp_path / 'hf'
  folder.mkdir()
  (folder / 'config.json').write_text('{}')
  with pytest.raises(ValueError, match=f"eval.evaluator='{folder}'"):
    hf_evaluator.HFEvaluator(str(folder))


def test_continuation_start():
  start = hf_evaluator.continuation_start
  assert start([5, 6], [5, 6, 7, 8]) == 2
  assert start([5, 6], [5, 9, 7]) == 1  # Merged boundary.
  assert start([], [5, 6]) == 1  # First token: no context.


def test_hf_evaluator_nll_matches_hand_computation(hf_dir):
  import torch  # pylint: disable=g-import-not-at-top
  evaluator = hf_evaluator.HFEvaluator(hf_dir, batch_size=2)
  prefixes = ['the cat', 'dogs ran', 'blue']
  texts = ['the cat sat on a mat.', 'dogs ran far away from home and birds',
           'blue skies']
  nll, count, cut = evaluator.nll(prefixes, texts)  # Padded 2nd batch.
  assert np.all(count > 0) and np.all(np.isfinite(nll)) and not cut.any()
  for prefix, text, got_nll, got_count in zip(prefixes, texts, nll, count):
    ids = evaluator.tokenizer(text)['input_ids']
    start = hf_evaluator.continuation_start(
        evaluator.tokenizer(prefix)['input_ids'], ids)
    with torch.no_grad():
      logits = evaluator.model(torch.tensor([ids]).to(evaluator.device))
      logits = logits.logits[0].double().cpu()
    lp = torch.log_softmax(logits, -1)
    want = -sum(float(lp[j - 1, ids[j]]) for j in range(start, len(ids)))
    assert got_count == len(ids) - start
    assert got_nll == pytest.approx(want, rel=1e-4)
  ppl = eval_metrics.perplexity_ci(nll, count, _SETTINGS)['mean']
  assert ppl == pytest.approx(math.exp(nll.sum() / count.sum()))
  assert 1.0 < ppl < 1e4


def _save_special_token_gpt2(out, template):
  """A tiny GPT-2 whose tokenizer wraps texts by `template` ('<s> $A',
  '<s> $A </s>')."""
  transformers = pytest.importorskip('transformers')
  import tokenizers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
      add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.train_from_iterator(_corpus(20, 30), tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<s>', '</s>'],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single=template, special_tokens=[('<s>', tok.token_to_id('<s>')),
                                       ('</s>', tok.token_to_id('</s>'))])
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token='<s>',
      eos_token='</s>').save_pretrained(str(out))
  torch.manual_seed(0)
  transformers.GPT2LMHeadModel(transformers.GPT2Config(
      n_layer=1, n_embd=16, n_head=2, n_positions=64,
      vocab_size=tok.get_vocab_size())).save_pretrained(str(out))
  return str(out)


@pytest.mark.parametrize('template', ['<s> $A', '<s> $A </s>'])
def test_evaluator_keeps_a_bos_and_scores_no_appended_eos(hf_dir, tmp_path,
                                                          template):
  # A tokenizer that appends eos (Llama's add_eos_token) had every sample
  # scored as if its text ended a document: one made-up token per sample.
  del hf_dir  # Only for its offline environment.
  evaluator = hf_evaluator.HFEvaluator(
      _save_special_token_gpt2(tmp_path / 'hf', template))
  [(ids, start, cut)] = evaluator.token_spans(['the cat'],
                                              ['the cat sat on a mat'])
  scored = evaluator.tokenizer.convert_ids_to_tokens(ids[start:])
  assert ''.join(scored).replace('Ġ', ' ') == ' sat on a mat'
  assert ids[0] == evaluator.tokenizer.bos_token_id and cut == 0
  assert evaluator.nll(['the cat'], ['the cat sat on a mat'])[1][0] == len(
      scored)


def test_leading_specials_fall_back_to_a_leading_bos():
  # A tokenizer whose probe text tokenises differently with its specials
  # still gets its BOS in front.
  class Merging:
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
      del text
      return {'input_ids': [1, 7, 8] if add_special_tokens else [5, 6]}

  assert hf_evaluator._leading_special_ids(Merging()) == [1]
  Merging.bos_token_id = None
  assert hf_evaluator._leading_special_ids(Merging()) == []


def test_evaluator_says_how_much_of_a_long_text_it_cut(hf_dir):
  evaluator = hf_evaluator.HFEvaluator(hf_dir)  # 64 positions.
  long_text = ' '.join(_WORDS * 4)
  whole = len(evaluator.tokenizer(long_text)['input_ids'])
  assert whole > 64
  nll, count, cut = evaluator.nll(['the cat'], [long_text])
  assert cut[0] == whole - 64
  [(_, start, _)] = evaluator.token_spans(['the cat'], [long_text])
  assert count[0] == 64 - start and np.isfinite(nll[0])


def test_missing_transformers_names_the_extra(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'transformers', None)
  (tmp_path / 'config.json').write_text('{}')
  with pytest.raises(ImportError, match=r'kforcing_jax\[eval\]'):
    hf_evaluator.HFEvaluator(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='eval.evaluator'):
    hf_evaluator.HFEvaluator(str(tmp_path / 'nope'))


# --------------------------------------------------------------------------
# eval.json schema.
# --------------------------------------------------------------------------


@pytest.mark.parametrize('mutate,needle', [
    (lambda d: d.pop('settings'), "'settings'"),
    (lambda d: d['settings'].pop('prefix_len'), 'settings.prefix_len'),
    (lambda d: d['models'].pop('teacher'), 'models.teacher'),
    (lambda d: d['models']['teacher']['metrics'].pop('entropy'),
     'models.teacher.metrics.entropy'),
    (lambda d: d['models']['teacher']['metrics']['entropy'].update(lo=5.0),
     'models.teacher.metrics.entropy'),
    (lambda d: d['models']['student_k2']['coupling']['per_slot'].pop(),
     'models.student_k2.coupling.per_slot'),
    (lambda d: d['models']['student_k2'].update(coupling=None),
     'models.student_k2.coupling'),
    (lambda d: d['models']['student_k2']['coupling']['forced_per_slot'].pop(),
     'models.student_k2.coupling.forced_per_slot has 1 entries'),
    (lambda d: d['models']['student_k2']['coupling'].pop('forced_per_slot'),
     'one of forced_agreement and forced_per_slot without the other'),
    (lambda d: d['models']['teacher'].update(k='1'), 'models.teacher.k'),
    (lambda d: d['models']['student_k2'].update(readout='top_k'),
     "models.student_k2.readout='top_k' unknown"),
    (lambda d: d['models']['student_k2'].update(temperature=0.0),
     'models.student_k2.temperature=0.0 must be finite and > 0'),
    (lambda d: d['models']['student_k2'].pop('temperature'),
     "missing key 'models.student_k2.temperature'"),
    (lambda d: d['models']['student_k2'].pop('readout'),
     "missing key 'models.student_k2.readout'"),
    (lambda d: d['models']['student_k2'].update(temperature=True),
     "'models.student_k2.temperature' is bool"),
    (lambda d: d['models']['student_k2'].update(temperature=0.8),
     "temperature=0.8 with readout 'argmax', which has none"),
    (lambda d: d['models']['teacher'].update(readout='argmax',
                                             temperature=1.0),
     'models.teacher is a teacher row: readout and temperature are for '
     'students only'),
    (lambda d: d['models']['teacher']['metrics']['teacher_ppl'].update(
        mean=None), 'models.teacher.metrics.teacher_ppl'),
    # A negative n skipped every other check of the stat.
    (lambda d: d['models']['teacher']['metrics']['teacher_ppl'].update(
        n=-1, mean=math.nan, lo=5.0, hi=1.0),
     'models.teacher.metrics.teacher_ppl.* has n=-1 < 0'),
])
def test_validate_eval_json_names_the_bad_key(mutate, needle):
  d = helpers.minimal_eval_json()
  eval_schema.validate_eval_json(d)
  mutate(d)
  with pytest.raises(ValueError, match=needle.replace('[', r'\[')):
    eval_schema.validate_eval_json(d)


# --------------------------------------------------------------------------
# End to end.
# --------------------------------------------------------------------------


def _check_outputs(workdir, result, names):
  with open(os.path.join(workdir, 'eval.json')) as f:
    on_disk = json.load(f)
  eval_schema.validate_eval_json(on_disk)
  assert on_disk == json.loads(json.dumps(result))
  assert list(on_disk['models']) == names
  for name in names:
    path = os.path.join(workdir, 'samples', f'{name}.jsonl')
    with open(path) as f:
      rows = [json.loads(line) for line in f]
    assert len(rows) == on_disk['settings']['num_samples']
    for row in rows:
      assert {'prefix', 'text', 'prefix_ids', 'token_ids'} <= set(row)
      assert len(row['prefix_ids']) == on_disk['settings']['prefix_len']
      assert len(row['token_ids']) == on_disk['settings']['max_new_tokens']
  return on_disk


@pytest.mark.parametrize('unwritable', ['', 'samples'])
def test_an_unwritable_workdir_is_refused_before_any_work(
    tmp_path, monkeypatch, unwritable):
  # On a read-only mount evaluate decoded and scored every model, then
  # failed writing samples/; report failed with a bare Errno 30.
  folder = tmp_path / unwritable
  folder.mkdir(exist_ok=True)
  helpers.read_only(monkeypatch, folder)
  monkeypatch.setattr(ev, '_load_teacher', helpers.must_not_run)
  with pytest.raises(ValueError, match=f'{folder} is not writable '
                     r'\(Read-only file system\): evaluate writes eval.json'
                     ' and samples/ there'):
    ev.run_evaluate(defaults.base_config(), str(tmp_path))
  if not unwritable:
    with pytest.raises(ValueError, match='report writes report.md there'):
      report.write_report(str(tmp_path))


def _fake_run(root, name):
  os.makedirs(os.path.join(root, name, 'checkpoints'))


def _untrained_setup(hf_dir, tmp_path, monkeypatch, damaged=()):
  """Config + workdir of random-init teacher and k=2 student runs.

  Runs named in `damaged` raise CheckpointError when loaded.
  """
  docs = tmp_path / 'docs'
  docs.mkdir()
  for i, text in enumerate(_corpus(11, 120, seed=1)):
    (docs / f'{i:02d}.txt').write_text(text)  # Document 10 is validation.
  config = defaults.base_config()
  config.model.update(dict(vocab_size=320, seq_len=14, num_layers=1,
                           d_model=16, num_heads=2, mlp_dim=32))
  config.data.update(dict(source='text', text_glob=str(docs / '*.txt'),
                          tokenizer_path=os.path.join(hf_dir,
                                                      'tokenizer.json')))
  config.eval = ml_collections.ConfigDict(dict(
      num_samples=5, batch_size=4, prefix_len=6, ks=(2,), penalties={},
      evaluator=hf_dir, bootstrap=50))
  teacher_cfg = model_lib.ModelConfig.from_config(config.model)
  student_cfg = dataclasses.replace(teacher_cfg, noise_window=2)
  runs = {'teacher': teacher_cfg, 'student_k2': student_cfg}
  for name in runs:
    _fake_run(str(tmp_path / 'w'), name)

  def load_params(run_dir):
    name = os.path.basename(run_dir)
    if name in damaged:
      raise ev.checkpoints.CheckpointError(f'{run_dir}: damaged')
    return runs[name], model_lib.init_params(runs[name],
                                             jax.random.PRNGKey(0)), {}

  monkeypatch.setattr(ev.checkpoints, 'load_params', load_params)
  return config, str(tmp_path / 'w')


def test_run_evaluate_notes_samples_the_evaluator_cut(hf_dir, tmp_path,
                                                      monkeypatch, capsys):
  # Texts past the evaluator's context were cut to it without a word.
  config, workdir = _untrained_setup(hf_dir, tmp_path, monkeypatch)
  real = ev.hf_evaluator.load_evaluator

  def short_context(s):
    evaluator = real(s)
    evaluator.max_len = 8  # Prefix + 8 new tokens re-tokenise to more.
    return evaluator

  monkeypatch.setattr(ev.hf_evaluator, 'load_evaluator', short_context)
  config.eval.split = 'train'  # Prefixes of training text: noted too.
  # 5 rows x 8 positions: 40 contexts, each once, and said (repeats were
  # drawn and counted as independent).
  config.eval.sweep_contexts = 64
  config.eval.penalties = {'k3': 0.3}  # ks=(2,): never used, and said so.
  result = ev.run_evaluate(config, workdir)
  assert ('eval.penalties for k=3 unused: no student row has that k '
          '(eval.ks, or every k up to the largest trained window)'
          ) in result['notes']
  assert ("eval.split='train' is data.train_split: its numbers are "
          'measured on training text, not held out') in result['notes']
  assert ('noise sweep: 40 distinct contexts (sequences x positions '
          'past the prefix), fewer than eval.sweep_contexts=64'
          ) in result['notes']
  sweep = result['models']['student_k2']['coupling']['noise_sweep']
  assert sweep['contexts'] == 40
  cut = [n for n in result['notes'] if 'not scored in evaluator_ppl' in n]
  assert [n.split(':')[0] for n in cut] == list(result['models'])
  assert all("of 5 samples are longer than the evaluator's 8 positions" in n
             for n in cut)
  # Said aloud too, not only written into eval.json, and once: the
  # training-text note, which the tokenizer's loading says, was repeated.
  said = capsys.readouterr()
  lines = (said.out + said.err).splitlines()
  for n in result['notes']:
    assert sum(line.endswith(f'NOTE: {n}') for line in lines) == 1, n


def test_run_evaluate_untrained_models(hf_dir, tmp_path, monkeypatch, capsys):
  """Full driver on random-init models, a text corpus and the HF evaluator."""
  config, workdir = _untrained_setup(hf_dir, tmp_path, monkeypatch)
  os.makedirs(os.path.join(workdir, 'samples'))
  stale = os.path.join(workdir, 'samples', 'student_k3.jsonl')
  with open(stale, 'w') as f:
    f.write('{}\n')
  calls = []
  for name in ('teacher_grids', 'sweep_student'):
    real = getattr(ev.noise_sweep, name)
    monkeypatch.setattr(
        ev.noise_sweep, name,
        lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
  config.eval.penalties = {'k2': 0.3}  # A penalised row of the same run.
  config.eval.sample_temperature = 0.8  # And a sampled-readout row,
  config.eval.median_temperature = 0.6  # and a median-readout one.
  result = ev.run_evaluate(config, workdir)
  d = _check_outputs(workdir, result, ['data', 'teacher', 'student_k2',
                                       'student_k2_penalty',
                                       'student_k2_sample',
                                       'student_k2_penalty_sample',
                                       'student_k2_median',
                                       'student_k2_penalty_median'])
  # The teacher is swept once, the run once per readout (argmax, median);
  # penalised and sampled rows get none (noise_sweep.py says why).
  assert calls == ['teacher_grids'] + ['sweep_student'] * 2
  for name in ('student_k2_penalty', 'student_k2_sample',
               'student_k2_penalty_sample', 'student_k2_penalty_median'):
    assert d['models'][name]['coupling']['noise_sweep'] is None
  assert (d['models']['student_k2']['coupling']['noise_sweep'] !=
          d['models']['student_k2_median']['coupling']['noise_sweep'])
  # The sampled row is the student's sampled readout of the shared noise.
  rows = {}
  for name in ('student_k2', 'student_k2_sample'):
    with open(os.path.join(workdir, 'samples', f'{name}.jsonl')) as f:
      rows[name] = [json.loads(line) for line in f]
    entry = d['models'][name]
    assert (entry['readout'], entry['temperature']) == (
        (rows[name][0]['readout'], rows[name][0]['temperature']))
  assert (d['models']['student_k2_sample']['readout'],
          d['models']['student_k2_sample']['temperature']) == ('sample', 0.8)
  assert d['models']['student_k2']['readout'] == 'argmax'
  cfg, params, _ = ev.checkpoints.load_params(
      os.path.join(workdir, 'student_k2'))
  noise = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (5, 8)))
  prefixes = np.array([r['prefix_ids'] for r in rows['student_k2_sample']])
  want = ev.generate_fixed(cfg, params, prefixes, noise, 2,
                           readout='sample', temperature=0.8)
  got = np.array([r['token_ids'] for r in rows['student_k2_sample']])
  np.testing.assert_array_equal(got, want)
  assert (got != np.array([r['token_ids'] for r in rows['student_k2']])
          ).any()
  with open(os.path.join(workdir, 'samples',
                         'student_k2_penalty_sample.jsonl')) as f:
    both = np.array([json.loads(line)['token_ids'] for line in f])
  np.testing.assert_array_equal(both, ev.generate_fixed(
      cfg, params, prefixes, noise, 2, penalty=0.3, readout='sample',
      temperature=0.8))
  # The median rows likewise, with their own readout and temperature.
  for name, penalty in (('student_k2_median', 0.0),
                        ('student_k2_penalty_median', 0.3)):
    assert (d['models'][name]['readout'],
            d['models'][name]['temperature']) == ('median', 0.6)
    with open(os.path.join(workdir, 'samples', f'{name}.jsonl')) as f:
      median = np.array([json.loads(line)['token_ids'] for line in f])
    np.testing.assert_array_equal(median, ev.generate_fixed(
        cfg, params, prefixes, noise, 2, penalty=penalty, readout='median',
        temperature=0.6))
  out = capsys.readouterr().out
  assert '[eval] noise sweep: the teacher' in out
  assert d['settings']['max_new_tokens'] == 8
  for entry in d['models'].values():
    assert entry['metrics']['evaluator_ppl']['n'] == 5
  sweep = d['models']['student_k2']['coupling']['noise_sweep']
  assert (sweep['contexts'], sweep['grid']) == (32, 1024)  # The defaults.
  assert 0 <= sweep['accuracy']['mean'] <= 1
  assert 1 <= sweep['distinct_student']['mean'] <= 320
  # The samples files rebuild the pooled evaluator perplexity.
  for name, entry in d['models'].items():
    with open(os.path.join(workdir, entry['samples_file'])) as f:
      rows = [json.loads(line) for line in f]
    tokens = sum(r['evaluator_tokens'] for r in rows)
    total = sum(r['evaluator_nll'] * r['evaluator_tokens'] for r in rows)
    assert math.exp(total / tokens) == pytest.approx(
        entry['metrics']['evaluator_ppl']['mean'], rel=1e-9), name
  assert not any('not scored in evaluator_ppl' in n for n in d['notes'])
  # The 'data' row scores the held-out continuation itself.
  with open(os.path.join(workdir, 'samples', 'data.jsonl')) as f:
    first = json.loads(f.readline())
  assert first['text'].startswith(first['prefix'].rstrip())
  # A sample file of an earlier evaluate is named, and kept.
  assert os.path.exists(stale)
  note = [l for l in out.splitlines() if 'NOTE' in l]
  assert len(note) == 1 and 'samples/student_k3.jsonl' in note[0]
  assert 'samples/teacher.jsonl' not in note[0]


def test_run_evaluate_decodes_with_the_configured_kernels(
    hf_dir, tmp_path, monkeypatch):
  """kernels.impl and kernels.attention_impl reach every decode of
  evaluate, as they do generate's."""
  config, workdir = _untrained_setup(hf_dir, tmp_path, monkeypatch)
  config.kernels.impl = 'chunked'
  config.kernels.attention_impl = 'xla'
  config.eval.sweep_contexts = 0
  seen = []
  real_generate = decode.generate

  def generate(*args, kernel_impl='auto', attention_impl='auto', **kwargs):
    seen.append((kernel_impl, attention_impl))
    return real_generate(*args, kernel_impl=kernel_impl,
                         attention_impl=attention_impl, **kwargs)

  monkeypatch.setattr(ev.decode, 'generate', generate)
  result = ev.run_evaluate(config, workdir)
  assert result['models']['student_k2']['coupling']['noise_sweep'] is None
  assert seen and set(seen) == {('chunked', 'xla')}


def test_run_evaluate_refuses_a_pallas_attention_a_run_cannot_take(
    hf_dir, tmp_path, monkeypatch):
  # The runs have head dim 8: refused naming the first, before decoding.
  config, workdir = _untrained_setup(hf_dir, tmp_path, monkeypatch)
  config.kernels.attention_impl = 'pallas'
  monkeypatch.setattr(ev.decode, 'generate', None)  # Not reached.
  with pytest.raises(ValueError, match="kernels.attention_impl='pallas' for "
                     'teacher: needs a head dim .* this model has 8'):
    ev.run_evaluate(config, workdir)
  assert not os.path.exists(os.path.join(workdir, 'samples'))


def test_run_evaluate_damaged_student_fails_before_scoring(
    hf_dir, tmp_path, monkeypatch):
  config, workdir = _untrained_setup(hf_dir, tmp_path, monkeypatch,
                                     damaged=('student_k2',))
  with pytest.raises(ev.checkpoints.CheckpointError, match='student_k2'):
    ev.run_evaluate(config, workdir)
  # Nothing was decoded or written: not even the data row's samples.
  assert not os.path.exists(os.path.join(workdir, 'samples'))


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  """Tiny teacher + students k=1,2,4 trained once (about a minute)."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags())  # One device: faster.
  for cmd in (['train-teacher'],
              ['distill', '--config.distill.steps_per_stage=20']):
    subprocess.run([sys.executable, '-m', 'kforcing_jax', cmd[0],
                    '--config=configs/tiny.py', f'--workdir={workdir}',
                    *cmd[1:]], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
  return workdir


@pytest.mark.slow
def test_run_evaluate_tiny_trained(trained_workdir, hf_dir, capsys):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.eval = ml_collections.ConfigDict(dict(
      num_samples=6, batch_size=4, evaluator=hf_dir, bootstrap=100))
  result = ev.run_evaluate(config, trained_workdir)
  names = ['data', 'teacher', 'student_k1', 'student_k2',
           'student_k2_penalty', 'student_k3', 'student_k3_penalty',
           'student_k4', 'student_k4_penalty']
  d = _check_outputs(trained_workdir, result, names)
  models = d['models']
  assert models['student_k3']['run'] == 'student_k4'
  # The checkpoint behind each row, and students short of this config's
  # distill.steps_per_stage (300; the fixture trained 20) are noted: they
  # were scored as finished, without a word.
  assert {run: r['step'] for run, r in d['checkpoints'].items()} == {
      'teacher': 40, 'student_k1': 20, 'student_k2': 20, 'student_k4': 20}
  assert all(len(r['run_id']) == 16 for r in d['checkpoints'].values())
  unfinished = [n for n in d['notes'] if 'unfinished' in n]
  assert unfinished == [
      f'student_k{k} is at step 20 of distill.steps_per_stage=300 '
      '(unfinished)' for k in (1, 2, 4)]
  assert len(models['student_k4']['coupling']['per_slot']) == 4
  assert len(models['student_k4']['coupling']['forced_per_slot']) == 4
  forced = models['student_k4']['coupling']['forced_agreement']
  assert forced['n'] == 6 and 0 <= forced['mean'] <= 1
  assert models['teacher']['coupling'] is None
  assert models['teacher']['decode']['tokens_per_s'] > 0
  # Sweeps on unpenalised rows only; k=3 and k=4 share run student_k4, so
  # theirs agree, and every run meets the same teacher grids (the caching
  # itself is spied in test_run_evaluate_untrained_models).
  sweeps = {name: m['coupling']['noise_sweep'] for name, m in models.items()
            if m['kind'] == 'student'}
  assert all((sw is None) == name.endswith('_penalty')
             for name, sw in sweeps.items())
  assert sweeps['student_k3'] == sweeps['student_k4']
  assert len({json.dumps(sweeps[f'student_k{k}']['entropy_teacher'])
              for k in (1, 2, 4)}) == 1
  assert d['settings']['max_new_tokens'] == 26
  out = capsys.readouterr().out
  assert 'stale' not in out and not any('stale' in n for n in d['notes'])
  assert all(f'[eval] {name}:' in out for name in names)
  assert 'noise sweep (32 contexts x 1024 u): slot-1 accuracy' in out
  assert 'tok/s' in out


@pytest.mark.slow
def test_a_student_whose_source_trained_on_is_noted_stale(trained_workdir):
  # A teacher trained on after distillation: evaluate compared the old
  # students with the new teacher, without a word.
  from kforcing_jax import checkpoints  # pylint: disable=g-import-not-at-top
  _, _, meta = checkpoints.load_params(os.path.join(trained_workdir,
                                                    'student_k2'))
  assert meta['source']['run'] == 'student_k1'
  assert ev._stale_source(trained_workdir, 'student_k2', meta) is None
  step = meta['source']['step']
  then = dict(meta, source={'run': 'student_k1', 'step': step - 5})
  assert ev._stale_source(trained_workdir, 'student_k2', then) == (
      f'student_k2 was distilled from student_k1 at step {step - 5}, which '
      f'is now at step {step}: student_k2 is stale (delete it and the '
      'stages after it, then re-run distill)')
  assert ev._stale_source(trained_workdir, 'teacher', {}) is None
  # The same step of a run trained anew (deleted, then retrained): it was
  # taken as the run the student was made from.
  now_id = checkpoints.Manager(os.path.join(
      trained_workdir, 'student_k1')).read_meta()['run_id']
  assert meta['source']['run_id'] == now_id
  anew = dict(meta, source=dict(meta['source'], run_id='0' * 16))
  assert ev._stale_source(trained_workdir, 'student_k2', anew) == (
      f'student_k2 was distilled from student_k1 at step {step}, which was '
      'trained anew since, to the same step: student_k2 is stale (delete it '
      'and the stages after it, then re-run distill)')
  # Records from before run ids: step and run alone, as before.
  old = dict(meta, source={'run': 'student_k1', 'step': step})
  assert ev._stale_source(trained_workdir, 'student_k2', old) is None


def test_a_student_distilled_at_another_temperature_is_noted(
    trained_workdir):
  # Its coupling and noise sweep compare it with the teacher at
  # temperature 1, which is not the one it learnt from: said in eval.json.
  from kforcing_jax import checkpoints  # pylint: disable=g-import-not-at-top
  _, _, meta = checkpoints.load_params(os.path.join(trained_workdir,
                                                    'student_k2'))
  assert meta['config']['distill']['teacher_temperature'] == 1.0
  assert ev._temperature_note('student_k2', meta) is None
  hotter = json.loads(json.dumps(meta))
  hotter['config']['distill']['teacher_temperature'] = 1.5
  assert ev._temperature_note('student_k2', hotter) == (
      'student_k2 was distilled with distill.teacher_temperature=1.5: its '
      'coupling and noise sweep compare it with the teacher at temperature '
      '1, the teacher evaluated here')
  del hotter['config']['distill']['teacher_temperature']  # Older runs.
  assert ev._temperature_note('student_k2', hotter) is None


def test_a_student_distilled_from_sampled_rollouts_is_noted():
  meta = {'config': {'distill': {'readout': 'sample',
                                 'readout_temperature': 0.8}}}
  assert ev._readout_note('student_k4', 4, meta) == (
      "student_k4 was distilled with distill.readout='sample' at "
      "distill.readout_temperature=0.8: it learnt student_k2's sampled "
      'rollouts, not its argmax')
  assert ev._readout_note('student_k1', 1, meta) is None  # The teacher's.
  meta['config']['distill']['readout'] = 'median'
  assert ev._readout_note('student_k2', 2, meta).endswith(
      "=0.8: it learnt student_k1's median rollouts, not its argmax")
  meta['config']['distill']['readout'] = 'argmax'
  assert ev._readout_note('student_k4', 4, meta) is None
  assert ev._readout_note('student_k4', 4, {'config': {}}) is None  # Older.


def test_only_process_0_writes_results(hf_dir, tmp_path, monkeypatch):
  # Every process of a multi-process run evaluates; one writes.
  config, workdir = _untrained_setup(hf_dir, tmp_path, monkeypatch)
  monkeypatch.setattr(ev.sharding, 'is_main_process', lambda: False)
  result = ev.run_evaluate(config, workdir)
  assert set(result['models']) == {'data', 'teacher', 'student_k2'}
  assert not {'eval.json', 'samples'} & set(os.listdir(workdir))


def test_a_failed_evaluate_leaves_the_previous_results_as_they_were(
    hf_dir, tmp_path, monkeypatch):
  # Samples are written with eval.json, after every model is scored: a run
  # that fails part-way must not leave eval.json pointing at new samples.
  config, workdir = _untrained_setup(hf_dir, tmp_path, monkeypatch)
  ev.run_evaluate(config, workdir)
  before = {}
  for name in ('eval.json', 'samples/data.jsonl', 'samples/teacher.jsonl'):
    with open(os.path.join(workdir, name)) as f:
      before[name] = f.read()
  config.eval.seed = 7  # Other noise: other teacher samples.
  real = ev.decode_all

  def fail_on_student(cfg, params, entry, *args):
    if entry.kind == 'student':
      raise RuntimeError('student decode failed')
    return real(cfg, params, entry, *args)

  monkeypatch.setattr(ev, 'decode_all', fail_on_student)
  with pytest.raises(RuntimeError, match='student decode failed'):
    ev.run_evaluate(config, workdir)
  for name, text in before.items():
    with open(os.path.join(workdir, name)) as f:
      assert f.read() == text, name


@pytest.mark.parametrize('num_samples', [64, 65, 33])
def test_decode_rate_counts_the_padded_rows_of_a_partial_batch(
    monkeypatch, num_samples):
  # Every batch (32 rows, partial ones padded) costs 0.1 s on a fake clock:
  # the rate is 32 rows * 3 tokens / 0.1 s whatever num_samples is.
  clock = [0.0]
  monkeypatch.setattr(ev.time, 'perf_counter', lambda: clock[0])

  def fake_generate(cfg, params, prefixes, noise, k, penalty, *impls):
    del impls  # kernel_impl, attention_impl.
    clock[0] += 0.1
    return np.zeros((len(prefixes), noise.shape[1]), np.int32)

  monkeypatch.setattr(ev, 'generate_fixed', fake_generate)
  entry = ev.ModelEntry('teacher', 'teacher', 'teacher', 1)
  tokens, timing = ev.decode_all(None, None, entry,
                                 np.zeros((num_samples, 2), np.int32),
                                 np.zeros((num_samples, 3), np.float32), 32)
  assert tokens.shape == (num_samples, 3)
  assert timing['tokens_per_s'] == pytest.approx(32 * 3 / 0.1)
  assert timing['includes_compile'] is False


class _EosTokenizer:
  eos_id = 1

  def decode(self, ids):
    return ' '.join(f'w{i}' for i in ids)


def test_evaluator_text_writes_eos_as_the_evaluators_separator():
  tok = _EosTokenizer()
  text = hf_evaluator.evaluator_text
  assert text(tok, [5, 6, 1, 7], '<E>') == 'w5 w6<E>w7'
  assert text(tok, np.array([1, 5, 1, 1]), '|') == '|w5||'
  assert text(tok, [5, 6], '<E>') == 'w5 w6'


def test_evaluator_scores_eos_as_its_own_eos_token(hf_dir):
  # The data tokenizer drops eos when decoding; the evaluator must see its
  # own <|endoftext|> there, not two documents glued into one word.
  from kforcing_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  config = defaults.base_config()
  config.data.tokenizer_path = os.path.join(hf_dir, 'tokenizer.json')
  tok = data_lib.get_tokenizer(config, hf_dir)
  evaluator = hf_evaluator.HFEvaluator(hf_dir)
  ids = tok.encode('the cat sat.') + [tok.eos_id] + tok.encode('dogs ran')
  text = hf_evaluator.evaluator_text(tok, ids, evaluator.document_separator)
  assert text == 'the cat sat.<|endoftext|>dogs ran'
  eos = evaluator.tokenizer.eos_token_id
  assert eos in evaluator.tokenizer(text)['input_ids']
  assert 'sat.dogs' in tok.decode(ids)  # What it was given before.


def test_generate_command_refuses_a_prompt_longer_than_seq_len(
    hf_dir, tmp_path, monkeypatch):
  # (Uses this file's tiny HF tokenizer and random-init runs.) A prompt
  # that fills model.seq_len leaves no room; the error says so by name
  # instead of "max_new_tokens=-23 must be >= 1".
  import types  # pylint: disable=g-import-not-at-top
  from kforcing_jax import commands  # pylint: disable=g-import-not-at-top
  config, workdir = _untrained_setup(hf_dir, tmp_path, monkeypatch)
  cfg = model_lib.ModelConfig.from_config(config.model)  # seq_len 14.
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  monkeypatch.setattr(commands.checkpoints, 'load_params',
                      lambda d: (cfg, params, {'config': config.to_dict()}))
  flags = types.SimpleNamespace(
      workdir=workdir, k=1, model='', config=None, max_new_tokens=None,
      seed=None, temperature=None, greedy=None, readout=None,
      frequency_penalty=None,
      prompt=['the cat sat on a mat while dogs ran far away from home'])
  with pytest.raises(ValueError, match=r'a prompt is \d+ tokens but '
                     r'model.seq_len is 14: no room to generate'):
    commands.generate(flags)


def test_generate_command_reads_a_student_out_as_asked(
    hf_dir, tmp_path, monkeypatch, capsys):
  # --readout (decode.readout): a sampled student takes --temperature; an
  # argmax student and the teacher say what they ignore.
  import types  # pylint: disable=g-import-not-at-top
  from kforcing_jax import commands  # pylint: disable=g-import-not-at-top
  config, workdir = _untrained_setup(hf_dir, tmp_path, monkeypatch)
  teacher_cfg = model_lib.ModelConfig.from_config(config.model)
  runs = {'teacher': teacher_cfg,
          'student_k2': dataclasses.replace(teacher_cfg, noise_window=2)}
  monkeypatch.setattr(
      commands.checkpoints, 'load_params',
      lambda d: (runs[os.path.basename(d)], model_lib.init_params(
          runs[os.path.basename(d)], jax.random.PRNGKey(0)),
                 {'config': config.to_dict()}))
  seen, real = [], decode.generate

  def generate(*args, **kwargs):
    seen.append((kwargs['readout'], kwargs['temperature']))
    return real(*args, **kwargs)

  monkeypatch.setattr(decode, 'generate', generate)
  flags = types.SimpleNamespace(
      workdir=workdir, k=2, model='', config=None, max_new_tokens=4,
      seed=None, temperature=0.7, greedy=None, readout='sample',
      frequency_penalty=None, prompt=['the cat'])
  shown = []
  for readout in ('sample', 'argmax', 'median'):
    commands.generate(types.SimpleNamespace(**dict(vars(flags),
                                                   readout=readout)))
    shown.append(capsys.readouterr())
  assert seen == [('sample', 0.7), ('argmax', 1.0), ('median', 0.7)]
  texts = [json.loads(out.out)['text'] for out in shown]
  assert len(set(texts)) == 3
  assert 'NOTE' not in shown[0].err + shown[2].err
  assert ("NOTE: --temperature ignored: a student's tokens are its readout "
          'of its noise slots (argmax; --readout=sample or =median reads '
          'its softmax'
          ) in shown[1].err
  for readout in ('sample', 'median'):
    commands.generate(types.SimpleNamespace(**dict(vars(flags), k=1,
                                                   readout=readout)))
    assert seen[-1] == ('argmax', 0.7)  # The teacher samples at 0.7 anyway.
    assert f'NOTE: --readout={readout} ignored: it is a student' in (
        capsys.readouterr().err)


def test_report_names_the_ci_level_and_resamples(tmp_path):
  from kforcing_jax import report  # pylint: disable=g-import-not-at-top
  d = helpers.minimal_eval_json()
  for ci_level, bootstrap, samples, label in (
      (0.95, 1000, 5, 'mean [95% bootstrap CI, 1000 resamples]'),
      (0.5, 200, 5, 'mean [50% bootstrap CI, 200 resamples]'),
      (0.95, 0, 5, 'mean [no CI: eval.bootstrap=0'),
      # One sample: bootstrap_ci gives lo = hi = mean, whatever resamples.
      (0.95, 1000, 1, 'mean [no CI: one sample, both bounds are the mean]')):
    d['settings'].update(ci_level=ci_level, bootstrap=bootstrap,
                         num_samples=samples)
    with open(tmp_path / 'eval.json', 'w') as f:
      json.dump(d, f)
    text = '\n'.join(report.quality_section(str(tmp_path)))
    assert label in text
    if bootstrap != 1000 or ci_level != 0.95 or samples == 1:
      assert '95% bootstrap CI, 1000' not in text


def test_report_shows_agreement_per_slot(tmp_path):
  from kforcing_jax import report  # pylint: disable=g-import-not-at-top
  d = helpers.minimal_eval_json()
  d['models']['student_k2']['coupling']['per_slot'] = [helpers.stat(0.25),
                                                       helpers.stat(0.125)]
  (tmp_path / 'eval.json').write_text(json.dumps(d))
  rows = {line.split(' | ')[0]: line for line in
          report.quality_section(str(tmp_path)) if line.startswith('| ')}
  assert rows['| student_k2'].endswith('| 0.250 / 0.125 | 1.000 / 1.000 |')
  assert rows['| teacher'].endswith('| n/a | n/a |')
  # The readout column: argmax, a sampled readout's temperature, or '-'.
  assert rows['| student_k2'].startswith('| student_k2 | 2 | 0 | argmax | ')
  assert rows['| teacher'].startswith('| teacher | 1 | 0 | - | ')
  d['models']['student_k2'].update(readout='sample', temperature=0.8)
  (tmp_path / 'eval.json').write_text(json.dumps(d))
  assert any(line.startswith('| student_k2 | 2 | 0 | sample, T=0.8 | ')
             for line in report.quality_section(str(tmp_path)))
  d['models']['student_k2'].update(readout='median', temperature=0.9)
  (tmp_path / 'eval.json').write_text(json.dumps(d))
  assert any(line.startswith('| student_k2 | 2 | 0 | median, T=0.9 | ')
             for line in report.quality_section(str(tmp_path)))
