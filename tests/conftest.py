"""Test-wide setup: 8 fake CPU devices (set before jax is imported)."""

import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from kforcing_jax import model as model_lib  # pylint: disable=wrong-import-position


@pytest.fixture
def small_cfg():
  return model_lib.ModelConfig(vocab_size=61, seq_len=48, num_layers=2,
                               d_model=32, num_heads=4, mlp_dim=64)
