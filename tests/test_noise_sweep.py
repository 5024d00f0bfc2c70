"""Tests of kforcing_jax.noise_sweep: metrics by hand, the teacher's grid
against its own probabilities, the batched student sweep against single
points, and its place in eval.json and the report."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kforcing_jax import decode
from kforcing_jax import distill
from kforcing_jax import eval_schema
from kforcing_jax import eval_settings
from kforcing_jax import model as model_lib
from kforcing_jax import noise_sweep as ns
from kforcing_jax import token_stats
from tests import helpers


def test_grid_stats_hand_values():
  teacher = [0, 0, 1, 1, 2, 2, 2, 3]
  student = [0, 0, 0, 0, 2, 2, 2, 2]
  got = ns.grid_stats(student, teacher)
  assert got['accuracy'] == 5 / 8
  assert got['distinct_teacher'] == 4 and got['distinct_student'] == 2
  p = np.array([2, 2, 3, 1]) / 8
  assert got['entropy_teacher'] == pytest.approx(-(p * np.log(p)).sum())
  assert got['entropy_student'] == pytest.approx(np.log(2))
  with pytest.raises(ValueError, match=r'\(3,\) and \(2,\)'):
    ns.grid_stats([1, 2, 3], [1, 2])


def test_grid_is_the_midpoints():
  np.testing.assert_allclose(ns.grid(4), [0.125, 0.375, 0.625, 0.875])
  assert ns.grid(4).dtype == np.float32


def test_pick_contexts_range_seed_and_errors():
  rows, ts = ns.pick_contexts(num_rows=3, seq_len=10, first_t=5, count=12,
                              seed=0)
  assert rows.min() >= 0 and rows.max() <= 2
  assert ts.min() >= 5 and ts.max() <= 8  # The slot predicts t + 1 <= 9.
  # 12 of the 3 x 4 pairs, without replacement: each pair once.
  assert len(set(zip(rows.tolist(), ts.tolist()))) == 12
  again = ns.pick_contexts(3, 10, 5, 12, seed=0)
  np.testing.assert_array_equal(again[0], rows)
  np.testing.assert_array_equal(again[1], ts)
  other = ns.pick_contexts(3, 10, 5, 5, seed=1)
  assert len(other[0]) == 5
  # More than there are: each of the 12 once (repeats were drawn before).
  rows, ts = ns.pick_contexts(3, 10, 5, 32, seed=0)
  assert len(set(zip(rows.tolist(), ts.tolist()))) == len(rows) == 12
  with pytest.raises(ValueError, match=r't in \[9, 8\]'):
    ns.pick_contexts(3, 10, 9, 4, seed=0)


def _teacher(small_cfg):
  return small_cfg, model_lib.init_params(small_cfg, jax.random.PRNGKey(3))


def test_teacher_grid_recovers_its_probabilities(small_cfg):
  """Grid counts of the inverse-CDF map match the teacher's CDF: a token
  holds the midpoints inside its interval, so the cumulative count over G
  is within 1/(2G) of F(v) at every v (plus float rounding)."""
  cfg, params = _teacher(small_cfg)
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(4),
                                         (cfg.seq_len,), 0, cfg.vocab_size))
  size, t = 4096, 17
  got = ns.teacher_tokens(cfg, params, tokens, t, ns.grid(size))
  assert got.shape == (size,)
  assert np.all(np.diff(got) >= 0)  # Monotone in u (vocabulary-id order).
  logits = model_lib.Transformer(cfg).apply({'params': params},
                                            jnp.asarray(tokens[None]))
  p = np.asarray(jax.nn.softmax(np.asarray(logits[0, t], np.float64)))
  cum = np.cumsum(np.bincount(got, minlength=cfg.vocab_size)) / size
  assert np.abs(cum - np.cumsum(p)).max() <= 0.5 / size + 1e-5
  assert token_stats.unigram_entropy(got) == pytest.approx(
      -(p * np.log(p)).sum(), abs=0.02)


def test_student_sweep_equals_single_points(small_cfg):
  """The batched, chunked sweep (many windows at one t in one pass) gives
  each u the token the student gives it alone: windows do not interact."""
  cfg = dataclasses.replace(small_cfg, noise_window=2)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(5))
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(6),
                                         (cfg.seq_len,), 0, cfg.vocab_size))
  u = ns.grid(300)  # More than one chunk: the last one is padded.
  t = 30
  got = ns.student_tokens(cfg, params, tokens, t, u)
  assert got.shape == (300,)
  assert len(set(got.tolist())) > 1  # The map depends on u at all.
  for g in (0, 1, 137, 255, 256, 299):
    alone = distill.pf_slot_logits(
        cfg, params, jnp.asarray(tokens[None]), jnp.array([[t]]),
        jnp.asarray(u[g]).reshape(1, 1, 1))
    assert got[g] == int(jnp.argmax(alone[0, 0, 0])), g


def test_median_sweep_reads_out_as_the_decoder(small_cfg):
  # A median row's sweep maps u to the token the decoder's median readout
  # emits in slot 1 from that u; a sampled row's is refused (its uniform,
  # frac(1024 u), would follow the grid).
  cfg = dataclasses.replace(small_cfg, noise_window=2)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(5))
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(6),
                                         (cfg.seq_len,), 0, cfg.vocab_size))
  u, t = ns.grid(64), 30
  got = ns.student_tokens(cfg, params, tokens, t, u, 'median', 0.7)
  assert len(set(got.tolist())) > 1  # The map depends on u at all.
  for g in (0, 21, 63):
    out = decode.generate(params, cfg, [tokens[:t + 1]], max_new_tokens=1,
                          k=1, noise=u[g].reshape(1, 1), readout='median',
                          temperature=0.7)
    assert got[g] == out.tokens[0, 0], g
  assert (got != ns.student_tokens(cfg, params, tokens, t, u)).any()
  with pytest.raises(ValueError, match="readout='sample': 'argmax' or"):
    ns.student_tokens(cfg, params, tokens, t, u, 'sample', 0.7)


def _sweep_json():
  return ns.to_json({key: np.array([0.5, 0.5]) for key in ns.STAT_KEYS},
                    64, lambda v: helpers.stat(float(np.mean(v))))


@pytest.mark.parametrize('mutate,needle', [
    (lambda sw: sw.update(grid=0), 'noise_sweep.grid=0'),
    (lambda sw: sw.update(contexts=True), 'noise_sweep.contexts=True'),
    (lambda sw: sw.pop('entropy_student'), 'noise_sweep.entropy_student'),
    (lambda sw: sw['accuracy'].update(lo=2.0), 'noise_sweep.accuracy'),
])
def test_eval_json_checks_the_noise_sweep(mutate, needle):
  d = helpers.minimal_eval_json()
  coupling = d['models']['student_k2']['coupling']
  # Absent: an eval.json from before the sweep.
  eval_schema.validate_eval_json(d)
  coupling['noise_sweep'] = None
  eval_schema.validate_eval_json(d)
  coupling['noise_sweep'] = _sweep_json()
  eval_schema.validate_eval_json(d)
  mutate(coupling['noise_sweep'])
  with pytest.raises(ValueError, match=needle):
    eval_schema.validate_eval_json(d)


def test_settings_refuse_a_bad_sweep():
  for field, value in (('sweep_contexts', -1), ('sweep_grid', 0)):
    config = ml_collections.ConfigDict({'eval': {field: value}})
    with pytest.raises(ValueError, match=f'eval.{field}={value}'):
      eval_settings.settings_from_config(config)
  off = eval_settings.settings_from_config(ml_collections.ConfigDict(
      {'eval': {'sweep_contexts': 0}}))
  assert off.sweep_contexts == 0


def test_report_shows_the_sweep_table_only_when_there_is_one(tmp_path):
  from kforcing_jax import report  # pylint: disable=g-import-not-at-top
  d = helpers.minimal_eval_json()
  path = tmp_path / 'eval.json'
  path.write_text(json.dumps(d))
  assert 'Noise sweep' not in '\n'.join(report.quality_section(str(tmp_path)))
  d['models']['student_k2']['coupling']['noise_sweep'] = _sweep_json()
  path.write_text(json.dumps(d))
  text = '\n'.join(report.quality_section(str(tmp_path)))
  assert 'at 2 held-out contexts, u on a 64-point grid' in text
  assert '| student_k2 | 0.500 [0.500, 0.500] |' in text
