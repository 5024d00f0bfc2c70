"""Few-row matmul cost of a config: `python -m kforcing_jax.row_matmuls`.

The roofline prices a decode step's matmuls at the large-matmul peak, so at
batch 1 a push-forward step (2k query rows) should cost about what an AR
step (1 row) costs: both read the same weights. This times the model's
weight matmuls alone (per layer q/k/v, out, MLP up and down, then the
unembedding) as one jitted chain of `--steps` steps, at each `--rows`
count, in XLA and (when installed) in torch on the same shapes and threads.
If 8 rows cost far more than 1 in both, the gap to the roofline at batch 1
is this CPU's small-row matmul rate, not the decode loop's:

    python -m kforcing_jax.row_matmuls --config=configs/demo.py --rows=1,8
"""

import argparse
import contextlib
import importlib.util
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import config_files
from kforcing_jax import model as model_lib
from kforcing_jax import roofline_cli
from kforcing_jax import torch_threads


def weight_shapes(cfg: model_lib.ModelConfig) -> list[tuple[int, int]]:
  """(in, out) of every weight matmul a decode step runs, in order."""
  d, f = cfg.d_model, cfg.mlp_dim
  return [(d, 3 * d), (d, d), (d, f), (f, d)] * cfg.num_layers + [
      (d, cfg.vocab_size)]


def flops_per_step(shapes, rows: int) -> float:
  return 2.0 * rows * sum(i * o for i, o in shapes)


def _weights(shapes, seed: int = 0) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [(rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)
          for s in shapes]


def _chain(x, weights, matmul):
  """Each weight's matmul in turn, each fed the last output cut to its
  input width (every output is at least as wide as the next input).
  Returns the next step's input, rescaled so values stay near 1 over many
  steps, and the sum of every output: it keeps each output whole, so the
  compiler cannot shrink a matmul to the columns the next one reads."""
  total = 0.0
  for w in weights:
    x = matmul(x[:, :w.shape[0]], w)
    total = total + x.sum()
  x = x[:, :weights[0].shape[0]]
  return x / ((x * x).mean() + 1e-6) ** 0.5, total


def xla_run(shapes, rows: int, steps: int):
  """A callable running `steps` steps of the chain in one jitted
  fori_loop, compiled and run once."""
  weights = [jnp.asarray(w) for w in _weights(shapes)]
  x0 = jnp.ones((rows, shapes[0][0]), jnp.float32)

  @jax.jit
  def loop(x, ws):
    def body(_, carry):
      x, acc = carry
      x, t = _chain(x, ws, jnp.matmul)
      return x, acc + t
    return jax.lax.fori_loop(0, steps, body, (x, jnp.float32(0)))
  run = lambda: jax.block_until_ready(loop(x0, weights))
  run()
  return run


def torch_run(shapes, rows: int, steps: int):
  """The same chain step by step in torch (eager, no autograd)."""
  import torch  # pylint: disable=g-import-not-at-top
  weights = [torch.from_numpy(w) for w in _weights(shapes)]
  x0 = torch.ones(rows, shapes[0][0])

  def run():
    with torch.inference_mode():
      x, acc = x0, 0.0
      for _ in range(steps):
        x, t = _chain(x, weights, torch.matmul)
        acc = acc + t
      return float(acc)
  run()
  return run


def _interleaved_medians(runs: list, repeats: int) -> list[float]:
  """Median seconds of each callable, timed in turn within every round,
  so a slow spell of the machine falls on all of them alike."""
  times = [[] for _ in runs]
  for _ in range(repeats):
    for run, out in zip(runs, times):
      start = time.perf_counter()
      run()
      out.append(time.perf_counter() - start)
  return [float(np.median(t)) for t in times]


def measure(cfg: model_lib.ModelConfig, rows, steps: int = 100,
            repeats: int = 7, with_torch: bool = True) -> list[dict]:
  """One record per (library, rows): us per step, GFLOP/s, and the cost
  relative to the first row count of the same library."""
  shapes = weight_shapes(cfg)
  if cfg.vocab_size < cfg.d_model:  # The chain cuts logits to the width.
    raise ValueError(f'model.vocab_size={cfg.vocab_size} < model.d_model='
                     f'{cfg.d_model}: the chain needs a vocabulary at least '
                     'as wide as the model')
  libraries = [('xla', xla_run, contextlib.nullcontext)]
  if with_torch and importlib.util.find_spec('torch') is not None:
    import torch  # pylint: disable=g-import-not-at-top
    # As many threads as XLA's CPU client uses, like the bench's HF peer.
    libraries.append(('torch', torch_run, lambda: torch_threads.torch_threads(
        torch, torch_threads.usable_cpu_count())))
  out = []
  for name, make, threads in libraries:
    with threads():
      medians = _interleaved_medians([make(shapes, r, steps) for r in rows],
                                     repeats)
    for r, run_s in zip(rows, medians):
      step_s = run_s / steps
      out.append({'library': name, 'rows': r, 'us_per_step': step_s * 1e6,
                  'gflops': flops_per_step(shapes, r) / step_s / 1e9,
                  'vs_first': run_s / medians[0]})
  return out


def _count(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f'{text!r}: need an int >= 1')
  return value


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      prog='python -m kforcing_jax.row_matmuls',
      description=__doc__.split('\n\n')[0])
  p.add_argument('--config', required=True, help='configs/X.py (its model).')
  p.add_argument('--rows', type=roofline_cli.int_list, default=[1, 8],
                 help='Row counts to time (default 1,8: an AR step and a '
                 'k=4 step at batch 1).')
  p.add_argument('--steps', type=_count, default=100,
                 help='Chain steps per timed run (default 100).')
  p.add_argument('--repeats', type=_count, default=7,
                 help='Timed rounds, each running every row count in turn; '
                 'the medians are shown (default 7).')
  p.add_argument('--no_torch', action='store_true',
                 help='Time XLA only.')
  args = p.parse_args(argv)
  try:
    cfg = model_lib.ModelConfig.from_config(
        config_files.load_config(args.config).model)
  except (ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  shapes = weight_shapes(cfg)
  mib = sum(i * o for i, o in shapes) * 4 / 2 ** 20
  print(f'{args.config}: {len(shapes)} weight matmuls per step, '
        f'{mib:.1f} MiB float32; median of {args.repeats} interleaved '
        f'runs of {args.steps} steps', flush=True)
  if args.no_torch:
    pass
  elif importlib.util.find_spec('torch') is None:
    print('torch not installed: XLA only (pip install -e ".[eval]")')
  else:
    print(f'torch on {torch_threads.usable_cpu_count()} threads, as XLA')
  print('library  rows  us/step   GFLOP/s  cost vs first')
  try:
    records = measure(cfg, args.rows, args.steps, args.repeats,
                      with_torch=not args.no_torch)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for r in records:
    print(f"{r['library']:7s} {r['rows']:5d} {r['us_per_step']:8.1f} "
          f"{r['gflops']:9.1f}  {r['vs_first']:12.2f}", flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
