"""Compiling, warming up and timing one decode per (model, k, batch) cell,
with its memory: host RSS, the device allocator and the compiled program."""

import dataclasses
import os
import resource
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import bench_models
from kforcing_jax import bench_settings
from kforcing_jax import decode


class _PeakRss:
  """Samples this process's RSS on a thread; `.peak` is the max seen."""

  def __init__(self, interval_s: float = 0.002):
    self.interval_s = interval_s
    self.peak = _rss_bytes()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, _rss_bytes())
      self._stop.wait(self.interval_s)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _rss_bytes())


def _rss_bytes() -> int:
  """Current resident set size (psutil, else /proc, else peak RSS)."""
  try:
    import psutil  # pylint: disable=g-import-not-at-top
    return psutil.Process().memory_info().rss
  except ImportError:
    pass
  try:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
  except OSError:
    return _maxrss_bytes()


def _maxrss_bytes() -> int:
  scale = 1 if sys.platform == 'darwin' else 1024  # Linux reports KiB.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _device_peak_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats()  # None on CPU.
  if not stats:
    return None
  return int(stats.get('peak_bytes_in_use', stats.get('bytes_in_use', 0)))


def _compiled_memory(compiled) -> dict[str, int] | None:
  try:
    ma = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None  # Not every backend implements it.
  if ma is None:
    return None
  fields = ('argument_size_in_bytes', 'output_size_in_bytes',
            'alias_size_in_bytes', 'temp_size_in_bytes',
            'generated_code_size_in_bytes')
  return {f: int(getattr(ma, f)) for f in fields if hasattr(ma, f)}


@dataclasses.dataclass
class Cell:
  """One compiled (model, k, batch) decode, warmed up and ready to time."""
  model: bench_models.BenchModel
  k: int
  batch: int
  max_new: int
  steps: int
  compiled: Any
  args: tuple
  lower_s: float
  compile_s: float
  memory: dict[str, Any]
  key_layout: str  # Resolved: decode.key_layout(spec), 'k' or 'kt'.
  attention_impl: str  # Resolved: decode.attention_impl(spec).
  times: list[float] = dataclasses.field(default_factory=list)

  def run(self) -> None:
    """One whole decode, waiting for its results; `run_once` times it."""
    jax.block_until_ready(self.compiled(*self.args))

  def run_once(self) -> float:
    """Seconds of one whole decode (dispatch to results on host)."""
    start = time.perf_counter()
    self.run()
    seconds = time.perf_counter() - start
    self.times.append(seconds)
    return seconds

  def result(self) -> dict[str, Any]:
    median = float(np.median(self.times))
    return {
        'model': self.model.name, 'weights': self.model.weights, 'k': self.k,
        'batch': self.batch, 'new_tokens': self.max_new,
        'num_steps': self.steps, 'lower_s': self.lower_s,
        'compile_s': self.compile_s, 'times_s': list(self.times),
        'median_s': median,
        'tokens_per_s': self.batch * self.max_new / median,
        'key_layout': self.key_layout,
        'attention_impl': self.attention_impl, 'memory': self.memory}


def prepare_cell(m: bench_models.BenchModel, k: int, prompts_BxP: np.ndarray,
                 max_new: int, s: bench_settings.BenchSettings) -> Cell:
  """Lowers, compiles and warms up decode_loop for one (model, k, batch)."""
  batch, prompt_len = prompts_BxP.shape
  steps = -(-max_new // k)
  sample = s.readout != 'argmax'
  spec = decode.DecodeSpec(model=m.cfg, k=k, num_steps=steps,
                           prompt_len=prompt_len, greedy=not sample,
                           key_layout=s.key_layout, kernel_impl=s.kernel_impl,
                           attention_impl=s.attention_impl,
                           readout=(s.readout if m.cfg.noise_window
                                    else 'argmax'))
  rng = np.random.default_rng(s.seed + k)
  args = (m.params, jnp.asarray(prompts_BxP),
          jnp.zeros((batch,), jnp.int32),
          jnp.asarray(rng.random((batch, steps * k), np.float32)),
          jnp.float32(1.0), jnp.float32(0.0))
  start = time.perf_counter()
  lowered = decode.decode_loop.lower(spec, *args)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  rss_before = _rss_bytes()
  # The first warm-up run (at least one is made) also samples peak RSS.
  with _PeakRss() as rss:
    tokens, _ = jax.block_until_ready(compiled(*args))
  if tokens.shape != (batch, steps * k):
    raise RuntimeError(f'decode_loop returned {tokens.shape}, expected '
                       f'{(batch, steps * k)}')
  for _ in range(s.warmup - 1):
    jax.block_until_ready(compiled(*args))
  memory = {'host_rss_delta_mib': (rss.peak - rss_before) / 2 ** 20,
            'host_maxrss_mib': _maxrss_bytes() / 2 ** 20,
            'device_peak_bytes': _device_peak_bytes(),
            'compiled': _compiled_memory(compiled)}
  return Cell(m, k, batch, max_new, steps, compiled, args, lower_s,
              compile_s, memory, decode.key_layout(spec),
              decode.attention_impl(spec))


def time_batch(models: dict[int, bench_models.BenchModel],
               prompts_BxP: np.ndarray, max_new: int,
               s: bench_settings.BenchSettings) -> list[Cell]:
  """Times every k at one batch size, repeats interleaved round-robin.

  Interleaving means a slow spell of a shared machine hits every k alike,
  so the speedups (ratios within a batch) stay fair. Each cell is warmed up
  when it is compiled, but the others compile after it; so every cell runs
  once more, untimed, right before the timed rounds (on an H100 the first
  run after the others had compiled was 20-70% slow).
  """
  cells = [prepare_cell(m, k, prompts_BxP, max_new, s)
           for k, m in sorted(models.items())]
  for cell in cells:
    cell.run()
  for _ in range(s.repeats):
    for cell in cells:
      cell.run_once()
  return cells
