"""Test-wide setup, before jax is imported: 8 fake CPU devices, LLVM at
-O0 and one XLA compilation cache for the run."""

import atexit
import os
import shutil
import sys
import tempfile

# LLVM at -O0: the test programs are tiny, so compiling them cost more than
# running them (the whole run took 19 min instead of 23 on 2 cores). Each
# invariant compares programs compiled alike. Subprocess tests keep it
# (helpers.xla_flags); the library itself compiles with XLA's defaults.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One XLA compilation cache for the whole run, shared by the xdist workers
# and the CLI subprocesses the tests start (they inherit the environment):
# each CLI command a test runs is a new process that compiles the same
# training and decoding steps again (a third of its time on 2 cores). An
# entry is reused only for the same program, flags and jax version, so no
# test checks less. Only compiles over 0.3 s are kept: caching every small
# one cost more than it saved. The size limit turns on jax's file lock,
# which the concurrent processes need.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix='kforcing_jax_tests_xla_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache_dir
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.3')
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(8 << 30))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from kforcing_jax import model as model_lib  # pylint: disable=wrong-import-position


@pytest.fixture
def small_cfg():
  return model_lib.ModelConfig(vocab_size=61, seq_len=48, num_layers=2,
                               d_model=32, num_heads=4, mlp_dim=64)
