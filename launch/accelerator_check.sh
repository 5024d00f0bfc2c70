#!/usr/bin/env bash
# Checks on one GPU (or TPU) host: the LM1B-size decoding benchmark with
# random weights (speed does not depend on them), then the model and decode
# invariant tests on the accelerator. Writes OUTDIR/bench_lm1b/bench.json,
# OUTDIR/bench_lm1b/bench.png, OUTDIR/bench.log and OUTDIR/tests.log; exits
# non-zero if either part failed (both always run).
#
#   launch/accelerator_check.sh OUTDIR [extra bench flags...]
#
# PYTHON (default python3) is the interpreter with jax, flax and this
# package's dependencies; torch and transformers add the Hugging Face peer.
set -uo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: launch/accelerator_check.sh OUTDIR [extra bench flags...]" >&2
  exit 2
fi
out=$(mkdir -p "$1" && cd "$1" && pwd) || exit 2
shift
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

# Half the accelerator's memory for JAX: the Hugging Face peer shares it.
XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 "$PYTHON" -m kforcing_jax bench \
  --config=configs/lm1b.py --workdir="$out/bench_lm1b" \
  --config.bench.random_weights=True --config.bench.repeats=10 \
  --config.bench.matmul_size=8192 --config.bench.copy_mib=1024 "$@" \
  2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}

# The tests pin CPU unless JAX_PLATFORMS is set; empty means the default
# backend. Only one process may hold a TPU, and a pytest worker that cannot
# get it would fall back to the CPU with a mere warning: on a TPU, one
# worker, pinned to the TPU so that it fails rather than falls back.
backend=$("$PYTHON" -c 'import jax; print(jax.default_backend())' \
  2>/dev/null | tail -n 1)
workers=4 platforms=''
if [[ "$backend" == tpu ]]; then
  workers=1 platforms=tpu
fi
echo "accelerator_check: tests on backend '${backend}', $workers worker(s)"
# Full-precision float32 dots (GPUs default to TF32), so the tests'
# tolerances mean what they mean on CPU; no preallocation, for 4 workers.
JAX_PLATFORMS="$platforms" JAX_DEFAULT_MATMUL_PRECISION=highest \
  XLA_PYTHON_CLIENT_PREALLOCATE=false \
  "$PYTHON" -m pytest -q -n "$workers" -p no:cacheprovider \
  tests/test_model.py tests/test_decode.py tests/test_decode_attention.py \
  2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}
echo "accelerator_check: bench exit $bench_rc, tests exit $tests_rc"
[[ "$bench_rc" == 0 && "$tests_rc" == 0 ]]
