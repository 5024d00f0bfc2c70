"""Roofline predictions without decoding: `python -m kforcing_jax.roofline_cli`.

Two uses:
  * what the cost model (roofline.py) predicts for a config at given
    ceilings, e.g. for an accelerator you do not have at hand:
      python -m kforcing_jax.roofline_cli --config=configs/lm1b.py \
          --peak_flops=989e12 --bandwidth=3.35e12 --batch_sizes=1,8,64
  * a recorded bench.json predicted again with the current cost model,
    from its own measured ceilings and settings, next to its measured
    speedups (the config must be the run's; its parameter counts are
    checked against the file's models):
      python -m kforcing_jax.roofline_cli --config=configs/demo.py \
          --bench_json=docs/bench_demo_cpu.json
"""

import argparse
import dataclasses
import sys

from kforcing_jax import bench_schema
from kforcing_jax import config_files
from kforcing_jax import model as model_lib
from kforcing_jax import roofline


def int_list(text: str) -> list[int]:
  """argparse type: comma-separated ints >= 1 (also row_matmuls')."""
  try:
    values = [int(v) for v in text.split(',') if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(
        f'{text!r}: need comma-separated ints, e.g. 1,8,64') from None
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f'{text!r}: need ints >= 1')
  return values


def _positive(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
  if not 0 < value < float('inf'):
    raise argparse.ArgumentTypeError(f'{text!r} must be > 0')
  return value


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m kforcing_jax.roofline_cli',
                              description=__doc__.split('\n')[0])
  p.add_argument('--config', required=True, help='config file (its model)')
  p.add_argument('--bench_json', default='',
                 help='a bench.json to predict again (ceilings, batches, ks, '
                 'prefix and new tokens from it)')
  p.add_argument('--peak_flops', type=_positive, help='FLOP/s')
  p.add_argument('--bandwidth', type=_positive, help='bytes/s')
  p.add_argument('--batch_sizes', type=int_list, default=[1, 8, 64, 256])
  p.add_argument('--ks', type=int_list, default=[2, 3, 4])
  p.add_argument('--prefix_len', type=int, default=6)
  p.add_argument('--max_new_tokens', type=int, default=0,
                 help='0: up to the model seq_len')
  return p


def _check_models(d: dict, ar: model_lib.ModelConfig,
                  pf: model_lib.ModelConfig, path: str) -> None:
  """The file's models must have the config's parameter counts."""
  want = {0: model_lib.count_params(model_lib.abstract_params(ar)),
          1: model_lib.count_params(model_lib.abstract_params(pf))}
  for m in d['models']:
    expected = want[int(m['noise_window'] > 0)]
    if m['num_params'] != expected:
      raise ValueError(
          f'{path}: model {m["name"]!r} has {m["num_params"]:,} parameters; '
          f'the --config model has {expected:,}: give the config the run '
          'used')


def rows(ar_cfg: model_lib.ModelConfig, pf_cfg: model_lib.ModelConfig,
         batch_sizes, ks, prefix_len: int, max_new: int, peak_flops: float,
         bandwidth: float):
  """[(batch, k, predictions in every mode)]."""
  ar, pf = roofline.ModelShape.of(ar_cfg), roofline.ModelShape.of(pf_cfg)
  return [(b, k, roofline.predictions(ar, pf, b, k, prefix_len, max_new,
                                      peak_flops, bandwidth))
          for b in batch_sizes for k in ks]


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    cfg = model_lib.ModelConfig.from_config(
        config_files.load_config(args.config).model)
    measured = {}
    if args.bench_json:
      d = bench_schema.load_bench_json(args.bench_json)
      settings, roof = d['settings'], d['roofline']
      batch_sizes, ks = settings['batch_sizes'], settings['ks']
      prefix_len, max_new = settings['prefix_len'], settings['max_new_tokens']
      peak, bw = roof['peak_flops'], roof['bandwidth']
      measured = {(r['batch'], r['k']): r['speedup'] for r in d['results']}
      mode = settings['roofline']
    else:
      if args.peak_flops is None or args.bandwidth is None:
        raise ValueError('give --peak_flops and --bandwidth, or --bench_json')
      batch_sizes, ks, prefix_len = args.batch_sizes, args.ks, args.prefix_len
      max_new = args.max_new_tokens or cfg.seq_len - prefix_len
      peak, bw = args.peak_flops, args.bandwidth
      mode = 'max'
    pf_cfg = dataclasses.replace(cfg, noise_window=max(ks))
    if args.bench_json:
      _check_models(d, cfg, pf_cfg, args.bench_json)
    if prefix_len < 1 or max_new < 1 or prefix_len + max_new > cfg.seq_len:
      raise ValueError(f'prefix_len={prefix_len} + max_new_tokens={max_new} '
                       f'must fit model.seq_len={cfg.seq_len}')
    table = rows(cfg, pf_cfg, batch_sizes, ks, prefix_len, max_new, peak, bw)
  except (ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'roofline of {args.config} ({cfg.dtype}): peak {peak / 1e9:,.1f} '
        f'GFLOP/s, bandwidth {bw / 1e9:,.2f} GB/s; {prefix_len}-token '
        f'prompts + {max_new} new tokens')
  head = 'batch  k  pred(max)  pred(sum)  per_op  full_cache'
  print(head + (f'  measured  meas/pred({mode})' if measured else ''))
  for b, k, p in table:
    line = (f'{b:5d} {k:2d}  {p["max"]:9.2f}  {p["sum"]:9.2f}  '
            f'{p["per_op"]:6.2f}  {p["full_cache"]:10.2f}')
    if (b, k) in measured:
      line += f'  {measured[b, k]:8.2f}  {measured[b, k] / p[mode]:9.2f}'
    print(line)
  return 0


if __name__ == '__main__':
  sys.exit(main())
