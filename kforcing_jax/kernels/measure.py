"""Times and sizes the reference vs chunked projected reductions.

Run with `python -m kforcing_jax.kernels.measure`. Prints:

1. Wall time of reference vs chunked argmax and cross-entropy fwd+bwd on the
   default backend (M=512, d=256, V=32768 by default).
2. XLA's memory analysis of a jitted cross-entropy fwd+bwd at a large
   vocabulary (M=4096, d=768, V=50257): compiled only, never run.

Pallas is not timed here: on CPU it only runs in interpret mode, whose speed
says nothing about the TPU kernel.
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from kforcing_jax import kernels


def _ce_fwd_bwd(impl, block_v, h_MxD, w_DxV, targets_M):
  """Mean loss, its gradients and the argmax: one training-step's worth."""

  def mean_loss(h_MxD, w_DxV):
    loss_M, argmax_M = kernels.projected_cross_entropy(
        h_MxD, w_DxV, targets_M, impl=impl, block_v=block_v)
    return jnp.mean(loss_M), argmax_M

  return jax.value_and_grad(mean_loss, argnums=(0, 1), has_aux=True)(h_MxD,
                                                                     w_DxV)


def _argmax(impl, block_v, h_MxD, w_DxV, targets_M):
  del targets_M
  return kernels.projected_argmax(h_MxD, w_DxV, impl=impl, block_v=block_v)


def _time(fn, args, repeats):
  """Median seconds per call of a jitted fn (compile excluded)."""
  jitted = jax.jit(fn)
  jax.block_until_ready(jitted(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(jitted(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _inputs(m, d, v, dtype):
  kh, kw, kt = jax.random.split(jax.random.key(0), 3)
  h_MxD = jax.random.normal(kh, (m, d), dtype)
  w_DxV = (jax.random.normal(kw, (d, v), jnp.float32) / d**0.5).astype(dtype)
  targets_M = jax.random.randint(kt, (m,), 0, v, jnp.int32)
  return h_MxD, w_DxV, targets_M


def _mib(n):
  return f'{n / 2**20:9.1f} MiB'


def time_section(m, d, v, chunks, repeats):
  print(f'== Wall time, {jax.default_backend()}, M={m} d={d} V={v} f32 '
        f'(median of {repeats}) ==')
  args = _inputs(m, d, v, jnp.float32)
  for name, op in [('argmax', _argmax), ('cross-entropy fwd+bwd', _ce_fwd_bwd)]:
    ref = _time(functools.partial(op, 'reference', None), args, repeats)
    print(f'{name:22s} reference          {ref * 1e3:8.1f} ms')
    for chunk in chunks:
      t = _time(functools.partial(op, 'chunked', chunk), args, repeats)
      print(f'{name:22s} chunked block_v={chunk:<5d}{t * 1e3:8.1f} ms '
            f'({t / ref:.2f}x reference)')


def memory_section(m, d, v, chunks):
  print(f'== Compiled memory of jitted cross-entropy fwd+bwd, M={m} d={d} '
        f'V={v} f32 ==')
  print(f'(one f32 (M, V) logits array is {_mib(4 * m * v)})')
  specs = (jax.ShapeDtypeStruct((m, d), jnp.float32),
           jax.ShapeDtypeStruct((d, v), jnp.float32),
           jax.ShapeDtypeStruct((m,), jnp.int32))
  for impl, chunk in [('reference', None)] + [('chunked', c) for c in chunks]:
    fn = jax.jit(functools.partial(_ce_fwd_bwd, impl, chunk))
    stats = fn.lower(*specs).compile().memory_analysis()
    label = impl if chunk is None else f'{impl} block_v={chunk}'
    if stats is None:
      print(f'{label:24s} memory_analysis() unavailable on this backend')
      continue
    # XLA's own peak_memory_in_bytes may omit temporaries on CPU, so the
    # bound arguments + outputs + temporaries (minus aliasing) is shown too.
    total = (stats.argument_size_in_bytes + stats.output_size_in_bytes +
             stats.temp_size_in_bytes - stats.alias_size_in_bytes)
    reported = getattr(stats, 'peak_memory_in_bytes', None)
    print(f'{label:24s} temp {_mib(stats.temp_size_in_bytes)}  '
          f'args {_mib(stats.argument_size_in_bytes)}  '
          f'outputs {_mib(stats.output_size_in_bytes)}  '
          f'args+out+temp {_mib(total)}  '
          f'peak_memory_in_bytes {_mib(reported) if reported else "n/a"}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--time_shape', default='512,256,32768',
                      help='M,d,V for the timing section.')
  parser.add_argument('--memory_shape', default='4096,768,50257',
                      help='M,d,V for the memory section.')
  parser.add_argument('--chunks', default='1024,2048,4096',
                      help='Chunked-variant block_v values to compare.')
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  chunks = [int(c) for c in args.chunks.split(',')]
  time_section(*map(int, args.time_shape.split(',')), chunks, args.repeats)
  print()
  memory_section(*map(int, args.memory_shape.split(',')), chunks)


if __name__ == '__main__':
  main()
