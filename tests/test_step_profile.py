"""step_profile: op kinds, per-step summaries and a real trace on CPU."""

import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from kforcing_jax import step_profile


@pytest.mark.parametrize('name, kind', [
    ('gemm_fusion_dot_1552', 'gemm_fusion_dot'),
    ('fusion.12', 'fusion'),
    ('input_reduce_fusion.1.2', 'input_reduce_fusion'),
    ('wrapped_convert_2', 'wrapped_convert'),
    ('loop_add_fusion', 'loop_add_fusion'),
    ('x' * 80 + '_3', 'x' * 60),
    ('kforcing_cached_attention_', 'kforcing_cached_attention'),
])
def test_op_kind_drops_numeric_suffixes(name, kind):
  assert step_profile.op_kind(name) == kind


def test_summarize_matches_hand_count():
  events = [('fusion.1', 1000.0), ('fusion.2', 3000.0), ('copy.7', 500.0),
            ('gemm_12', 6000.0)]
  s = step_profile.summarize('device', events, steps=2)
  assert s['ops_per_step'] == 2.0
  assert s['busy_us_per_step'] == pytest.approx(5.25)
  assert s['kinds'] == [
      {'kind': 'gemm', 'per_step': 0.5, 'us_per_step': 3.0},
      {'kind': 'fusion', 'per_step': 1.0, 'us_per_step': 2.0},
      {'kind': 'copy', 'per_step': 0.5, 'us_per_step': 0.25}]
  assert [k['kind'] for k in step_profile.summarize(
      'device', events, 2, top=1)['kinds']] == ['gemm']
  with pytest.raises(ValueError, match='steps=0'):
    step_profile.summarize('device', events, steps=0)


def test_profile_run_counts_a_loops_ops_per_step_on_cpu(tmp_path):
  # A 10-step while loop: its body's ops run 10 times, the loop itself
  # (a container of those ops) is not counted.
  w = jnp.eye(16) * 0.5

  @jax.jit
  def loop(x):
    return jax.lax.fori_loop(0, 10, lambda i, x: jnp.sin(x @ w) + i, x)
  x = jnp.ones((4, 16))
  loop(x).block_until_ready()
  p = step_profile.profile_run(lambda: loop(x).block_until_ready(),
                               str(tmp_path / 'trace'), steps=10)
  assert p['source'] == 'host'  # No device plane on CPU.
  assert p['trace_dir'] == str(tmp_path / 'trace')
  assert any(f.endswith('.xplane.pb')
             for _, _, fs in os.walk(p['trace_dir']) for f in fs)
  assert p['busy_us_per_step'] > 0
  # At least one op kind ran once per step or more: the loop body. None
  # ran twice per step (each body op is one thunk per iteration; counting
  # an event twice, or a loop's per-iteration markers, would double it).
  per_step = [k['per_step'] for k in p['kinds']]
  assert 1.0 <= max(per_step) < 2.0
  assert p['ops_per_step'] < 8
  kinds = {k['kind'] for k in p['kinds']}
  assert not {'while', 'ThunkExecutor::Execute'} & kinds
  assert not [k for k in kinds if k.startswith('end: ')]


def test_device_ops_prefer_the_xla_ops_line_and_drop_containers():
  def line(name, *events):
    return SimpleNamespace(name=name, events=[
        SimpleNamespace(name=n, duration_ns=d) for n, d in events])
  tpu = [line('XLA Modules', ('jit_decode_loop', 900.0)),
         line('XLA Ops', ('while.3', 800.0), ('fusion.1', 300.0),
              ('convolution.2', 400.0)),
         line('Stream #1', ('should_not_count', 5.0))]
  assert step_profile.device_ops(tpu) == [('fusion.1', 300.0),
                                          ('convolution.2', 400.0)]
  gpu = [line('Stream #13(Compute)', ('gemm_fusion_dot_7', 10.0)),
         line('Stream #14(MemcpyD2H)', ('MemcpyD2H', 2.0)),
         line('Launch Stats', ('cuLaunchKernel', 1.0))]
  assert step_profile.device_ops(gpu) == [('gemm_fusion_dot_7', 10.0),
                                          ('MemcpyD2H', 2.0)]


def test_format_profiles_lines_up_kinds_and_marks_missing_ones():
  ar = step_profile.summarize('device', [('convert_1', 4000.0),
                                         ('dot_2', 2000.0)], 2)
  pf = step_profile.summarize('device', [('dot_3', 5000.0),
                                         ('slice_4', 1000.0)], 1)
  text = step_profile.format_profiles(8, [('k=1', ar), ('k=4', pf)])
  lines = text.splitlines()
  assert lines[0].startswith('profile, batch 8')
  assert lines[1].split()[-2:] == ['k=1', 'k=4']
  rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
  assert rows['dot'] == ['0.5', '1.0', '1.0', '5.0']
  assert rows['slice'] == ['-', '1.0', '1.0']
  assert rows['convert'] == ['0.5', '2.0', '-']
  assert rows['all'] == ['ops', '1.0', '3.0', '2.0', '6.0']


def test_a_kind_cheap_in_one_profile_is_not_shown_as_missing():
  # summarize kept each profile's top 25 kinds: a kind ranked 27th in the
  # AR profile showed '-' there, beside the k=4 profile it led.
  ar = step_profile.summarize(
      'device', [(f'op{chr(97 + i)}_1', 1000.0) for i in range(26)] +
      [('rare_2', 1.0)], 1)
  pf = step_profile.summarize('device', [('rare_3', 9000.0)], 1)
  assert len(ar['kinds']) == 27
  text = step_profile.format_profiles(1, [('k=1', ar), ('k=4', pf)])
  rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:]}
  assert rows['rare'] == ['1.0', '0.0', '1.0', '9.0']


def test_format_profiles_says_when_a_trace_had_no_readable_ops():
  empty = step_profile.summarize('host', [], 3)
  assert empty['ops_per_step'] == 0 and empty['kinds'] == []
  text = step_profile.format_profiles(1, [('k=1', empty)])
  assert 'no op events this module can read in the trace of k=1' in text
