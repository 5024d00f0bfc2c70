"""Where a decode's time goes: one traced run, summarised per kind of op.

`bench.profile=True` runs every timed cell once more under the JAX profiler
and reduces the trace to a table of op kinds (XLA fusions, library kernels,
with their numeric suffixes dropped, so `gemm_fusion_dot_1552` and
`gemm_fusion_dot_388` count together) with how many ran per decode step and
their microseconds per step. On a GPU or TPU the ops are the device's
kernels; on CPU, XLA:CPU's thunks on the host threads. A traced run is
slower than an untimed one (a GPU runs op by op while traced, not as one
recorded graph), so compare kinds and counts, not the totals with the
bench's medians.
"""

import glob
import os
import re
from collections import defaultdict
from typing import Any, Callable

import jax

# Host-trace events that are not ops, and ops that contain other ops
# (counting them would count their ops twice).
_NOT_OPS = ('ThunkExecutor::', 'ThreadpoolListener::', 'end: ')
_CONTAINERS = ('while', 'conditional', 'call')
_KIND_CHARS = 60
_COLUMN = 22


def op_kind(name: str) -> str:
  """An op's name without its numeric suffixes ('fusion.12' -> 'fusion',
  'wrapped_convert_2' -> 'wrapped_convert'), at most 60 characters."""
  kind = re.sub(r'([._]\d+)+$', '', name)
  # A kernel may also appear with a bare trailing '_' (a Pallas kernel
  # 'k' as 'k' and 'k_'): one kind.
  kind = kind.rstrip('._') or name
  return kind[:_KIND_CHARS]


def _is_host_op(name: str) -> bool:
  return not name.startswith(_NOT_OPS) and op_kind(name) not in _CONTAINERS


def device_ops(lines) -> list[tuple[str, float]]:
  """[(op name, ns)] of one device plane's lines (objects with `name` and
  `events`, each event with `name` and `duration_ns`): its 'XLA Ops' line
  where it has one (TPU), else its stream lines (GPU kernels); containers
  dropped, as their ops are on the same line."""
  ops = [l for l in lines if l.name == 'XLA Ops']
  out = []
  for line in ops or [l for l in lines if l.name.startswith('Stream')]:
    out += [(e.name, e.duration_ns) for e in line.events
            if op_kind(e.name) not in _CONTAINERS]
  return out


def trace_events(xplane_path: str) -> tuple[str, list[tuple[str, float]]]:
  """('device' or 'host', [(op name, duration in ns)]) of one trace file.

  Device planes (GPU, TPU): see `device_ops`. Without a device plane
  (CPU): the XLA:CPU client's host threads, minus containers and end
  markers.
  """
  data = jax.profiler.ProfileData.from_file(xplane_path)
  device = []
  for plane in data.planes:
    if plane.name.startswith('/device:'):
      device += device_ops(list(plane.lines))
  if device:
    return 'device', device
  host = []
  for plane in data.planes:
    for line in plane.lines:
      if 'XLAPjRtCpuClient' not in line.name and 'XLAEigen' not in line.name:
        continue
      host += [(e.name, e.duration_ns) for e in line.events
               if _is_host_op(e.name)]
  return 'host', host


def summarize(source: str, events: list[tuple[str, float]], steps: int,
              top: int | None = None) -> dict[str, Any]:
  """Per-step op counts and times of one decode of `steps` steps: every
  op kind by default (cut to 25, a kind outside one profile's top showed
  as '-', never run, beside another profile where it ranked high)."""
  if steps < 1:
    raise ValueError(f'steps={steps}: a decode has at least one step')
  kinds = defaultdict(lambda: [0, 0.0])
  for name, duration_ns in events:
    row = kinds[op_kind(name)]
    row[0] += 1
    row[1] += duration_ns
  rows = sorted(kinds.items(), key=lambda kv: (-kv[1][1], kv[0]))
  return {
      'source': source, 'steps': steps,
      'ops_per_step': len(events) / steps,
      'busy_us_per_step': sum(d for _, d in events) / steps / 1e3,
      'kinds': [{'kind': kind, 'per_step': count / steps,
                 'us_per_step': ns / steps / 1e3}
                for kind, (count, ns) in rows[:top]]}


def profile_run(run: Callable[[], Any], trace_dir: str,
                steps: int) -> dict[str, Any]:
  """Runs `run` once under the profiler (trace kept in `trace_dir`, for
  TensorBoard / XProf) and summarises it; see `summarize`."""
  with jax.profiler.trace(trace_dir):
    run()
  paths = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'),
                           recursive=True), key=os.path.getmtime)
  if not paths:
    raise RuntimeError(f'the profiler wrote no trace under {trace_dir}')
  source, events = trace_events(paths[-1])
  return {**summarize(source, events, steps), 'trace_dir': trace_dir}


def format_profiles(batch: int, labelled: list[tuple[str, dict[str, Any]]],
                    rows: int = 12) -> str:
  """One batch's profiles side by side: ops per step and us per step of
  the kinds that cost most in any of them."""
  kinds: dict[str, float] = {}
  for _, p in labelled:
    for row in p['kinds']:
      kinds[row['kind']] = max(kinds.get(row['kind'], 0.0),
                               row['us_per_step'])
  shown = sorted(kinds, key=lambda k: -kinds[k])[:rows]

  def cell(count, us):
    return f'{count:10.1f}{us:12.1f}'
  lines = [f'profile, batch {batch}: ops and microseconds per decode step',
           f'{"op kind":<40}' + ''.join(f'{label:>{_COLUMN}}'
                                         for label, _ in labelled)]
  for kind in shown:
    row = ''
    for _, p in labelled:
      r = next((r for r in p['kinds'] if r['kind'] == kind), None)
      row += (cell(r['per_step'], r['us_per_step']) if r
              else f'{"-":>{_COLUMN}}')
    lines.append(f'{kind[:39]:<40}' + row)
  lines.append(f'{"all ops":<40}' + ''.join(
      cell(p['ops_per_step'], p['busy_us_per_step']) for _, p in labelled))
  empty = [label for label, p in labelled if not p['ops_per_step']]
  if empty:
    lines.append(f'(no op events this module can read in the trace of '
                 f'{", ".join(empty)}; open its trace_dir in TensorBoard)')
  return '\n'.join(lines)
