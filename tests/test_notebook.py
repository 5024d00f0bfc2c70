"""Runs notebooks/colab_demo.ipynb top to bottom on CPU with the tiny config.

Slow (a couple of minutes on 2 cores): train, distil, decode and benchmark.
Needs nbclient, nbformat and ipykernel (the `test` extra); skipped without.
"""

import os

import pytest

from tests import helpers

nbclient = pytest.importorskip('nbclient')
nbformat = pytest.importorskip('nbformat')
pytest.importorskip('ipykernel')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'colab_demo.ipynb')


def _text_outputs(cell) -> str:
  """Everything a code cell printed (streams and text/plain results)."""
  parts = []
  for out in cell.get('outputs', []):
    if out.output_type == 'stream':
      parts.append(out.text)
    elif 'data' in out and 'text/plain' in out.data:
      parts.append(out.data['text/plain'])
  return ''.join(parts)


def _has_image(cell) -> bool:
  return any('image/png' in out.get('data', {})
             for out in cell.get('outputs', []))


@pytest.mark.slow
def test_colab_demo_runs_on_cpu(tmp_path, monkeypatch):
  workdir = tmp_path / 'workdir'
  run_dir = tmp_path / 'cwd'  # The kernel's working directory.
  run_dir.mkdir()
  # The kernel inherits this environment: the package from this checkout,
  # one CPU device, the tiny config with few steps, a private workdir.
  env = {
      'PYTHONPATH': os.pathsep.join(
          [ROOT] + [p for p in [os.environ.get('PYTHONPATH', '')] if p]),
      'JAX_PLATFORMS': 'cpu',
      'XLA_FLAGS': helpers.xla_flags(),  # One device: faster.
      'MPLBACKEND': 'module://matplotlib_inline.backend_inline',
      'KFORCING_NOTEBOOK_CONFIG': 'tiny',
      'KFORCING_NOTEBOOK_WORKDIR': str(workdir),
      'KFORCING_NOTEBOOK_TEACHER_STEPS': '20',
      'KFORCING_NOTEBOOK_DISTILL_STEPS': '8',
  }
  for name, value in env.items():
    monkeypatch.setenv(name, value)

  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name='python3',
      resources={'metadata': {'path': str(run_dir)}})
  # Raises CellExecutionError (with the traceback) if any cell fails.
  client.execute()

  code_cells = [c for c in nb.cells if c.cell_type == 'code']
  for cell in code_cells:
    errors = [o for o in cell.get('outputs', []) if o.output_type == 'error']
    assert not errors, f'cell failed:\n{cell.source}\n{errors}'
  printed = [_text_outputs(c) for c in code_cells]
  everything = '\n'.join(printed)

  assert 'nothing to install' in printed[0]  # The install cell was skipped.
  assert "config 'tiny'" in everything
  # DISTILL_STEPS sets every stage, whatever distill.stage_steps held.
  assert 'distill steps by window {1: 8, 2: 8, 4: 8}' in everything
  # The side-by-side decode: both k values, for every prompt.
  decode_text = next(p for p in printed if 'Prompt:' in p)
  assert decode_text.count('  k=1 (teacher') == 2, decode_text
  assert decode_text.count('  k=4 (student_k4') == 2, decode_text
  assert 'speedup of k=4 over k=1' in everything
  # The speed chart (and the bench figure when kforcing_jax.bench exists).
  assert any(_has_image(c) for c in code_cells)
  assert (workdir / 'teacher').is_dir()
  assert (workdir / 'student_k4').is_dir()

  # Re-run with more teacher steps, up to the distillation cell: the
  # teacher trains on, and the finished students are kept but named stale.
  monkeypatch.setenv('KFORCING_NOTEBOOK_TEACHER_STEPS', '24')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  last = next(i for i, c in enumerate(nb.cells) if 'run_distill' in c.source
              and c.cell_type == 'code')
  nb.cells = nb.cells[:last + 1]
  nbclient.NotebookClient(
      nb, timeout=600, kernel_name='python3',
      resources={'metadata': {'path': str(run_dir)}}).execute()
  teacher_cell, distill_cell = (_text_outputs(c) for c in nb.cells[-2:])
  assert "'step': 24" in teacher_cell, teacher_cell
  assert 'WARNING' in distill_cell and 'stale' in distill_cell, distill_cell


def test_devices_cell_warns_when_jax_misses_the_runtimes_accelerator(
    monkeypatch, capsys):
  # On Colab the install cell can upgrade jax without its GPU/TPU plugin:
  # the notebook must say so instead of silently training on the CPU.
  import glob  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(NOTEBOOK, as_version=4)
  cell = next(c.source for c in nb.cells
              if c.cell_type == 'code' and 'PLATFORM =' in c.source)
  monkeypatch.delenv('COLAB_TPU_ADDR', raising=False)
  for gpu, tpu, warning in (
      (True, False, 'has a GPU, but JAX'), (False, True, 'has a TPU, but JAX'),
      (False, False, None)):
    monkeypatch.setattr(shutil, 'which',
                        lambda name, g=gpu: '/usr/bin/nvidia-smi' if g else None)
    monkeypatch.setattr(glob, 'glob',
                        lambda pattern, t=tpu: ['/dev/accel0'] if t else [])
    namespace = {'os': os}
    exec(cell, namespace)  # pylint: disable=exec-used
    out = capsys.readouterr().out
    assert namespace['PLATFORM'] == 'cpu'
    if warning is None:
      assert 'WARNING' not in out, out
    else:
      assert warning in out, out
      assert ('"jax[tpu]"' if tpu else '"jax[cuda12]"') in out
