"""The few-row matmul measurement (row_matmuls.py) on tiny shapes."""

import dataclasses
import importlib
import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest

from kforcing_jax import config_files
from kforcing_jax import model as model_lib
from kforcing_jax import row_matmuls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**changes):
  cfg = model_lib.ModelConfig.from_config(config_files.load_config(
      os.path.join(ROOT, 'configs', 'tiny.py')).model)
  return dataclasses.replace(cfg, **changes)


def test_shapes_and_flops_are_the_decode_steps_weight_matmuls():
  cfg = _cfg(num_layers=2, d_model=4, num_heads=2, mlp_dim=8,
             vocab_size=16)
  shapes = row_matmuls.weight_shapes(cfg)
  assert shapes == [(4, 12), (4, 4), (4, 8), (8, 4)] * 2 + [(4, 16)]
  # 2 FLOPs per multiply-add: (48 + 16 + 32 + 32) * 2 layers + 64 = 320.
  assert row_matmuls.flops_per_step(shapes, rows=3) == 2 * 3 * 320


def test_xla_and_torch_run_the_same_chain():
  # Both libraries must time the same work: one step from the same input
  # gives the same output and the same sum of every matmul's output.
  torch = pytest.importorskip('torch')
  shapes = row_matmuls.weight_shapes(_cfg(
      num_layers=2, d_model=8, num_heads=2, mlp_dim=16, vocab_size=32))
  weights = row_matmuls._weights(shapes)  # pylint: disable=protected-access
  x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
  jx, jt = row_matmuls._chain(  # pylint: disable=protected-access
      jnp.asarray(x), [jnp.asarray(w) for w in weights], jnp.matmul)
  tx, tt = row_matmuls._chain(  # pylint: disable=protected-access
      torch.from_numpy(x), [torch.from_numpy(w) for w in weights],
      torch.matmul)
  np.testing.assert_allclose(np.asarray(jx), tx.numpy(), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(float(jt), float(tt), rtol=1e-4, atol=1e-4)
  # By hand: the chain's matmuls one after another, each input cut.
  h, total = x, 0.0
  for w in weights:
    h = h[:, :w.shape[0]] @ w
    total += h.sum()
  np.testing.assert_allclose(float(jt), total, rtol=1e-4, atol=1e-4)


def test_measure_reports_consistent_rates():
  cfg = _cfg()
  torch = (importlib.import_module('torch')
           if importlib.util.find_spec('torch') else None)
  before = torch and torch.get_num_threads()
  try:
    if torch is not None:
      torch.set_num_threads(1)
    records = row_matmuls.measure(cfg, rows=(1, 2), steps=2, repeats=1)
    if torch is not None:  # Timed on XLA's thread count, then given back.
      assert torch.get_num_threads() == 1
  finally:
    if torch is not None:
      torch.set_num_threads(before)
  libraries = ['xla'] + (['torch'] if importlib.util.find_spec('torch')
                         else [])
  assert [(r['library'], r['rows']) for r in records] == [
      (lib, rows) for lib in libraries for rows in (1, 2)]
  shapes = row_matmuls.weight_shapes(cfg)
  for r in records:
    assert r['us_per_step'] > 0
    # GFLOP/s is the chain's FLOPs over the time shown.
    assert r['gflops'] * r['us_per_step'] * 1e3 == pytest.approx(
        row_matmuls.flops_per_step(shapes, r['rows']))
  for i in range(0, len(records), 2):
    first, second = records[i], records[i + 1]
    assert first['vs_first'] == 1.0
    assert second['vs_first'] == pytest.approx(
        second['us_per_step'] / first['us_per_step'])


def test_bad_input_is_refused_before_timing(capsys):
  with pytest.raises(SystemExit) as e:
    row_matmuls.main(['--config=configs/tiny.py', '--rows=0,8'])
  assert e.value.code == 2
  assert "'0,8': need ints >= 1" in capsys.readouterr().err
  with pytest.raises(ValueError, match='model.vocab_size=4 < model.d_model'):
    row_matmuls.measure(_cfg(vocab_size=4), rows=(1,))
  assert row_matmuls.main(['--config=configs/nope.py']) == 2
  assert 'nope.py' in capsys.readouterr().err
