"""The notebooks run end to end on tiny settings (VIT_NOTEBOOK_TINY=1), so they never rot; the committed ones
show the results of a real run (`python notebooks/execute.py`)."""
import os
import re

import nbclient
import nbformat
import pytest

from conftest import ROOT

NOTEBOOKS = ['classify_and_attention', 'finetune_image_folder', 'analysis_figures', 'transfer_small_dataset']


@pytest.mark.slow
@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_runs(name, tmp_path, data_dir, monkeypatch):
  monkeypatch.setenv('VIT_NOTEBOOK_TINY', '1')
  monkeypatch.setenv('VIT_NOTEBOOK_DIR', str(tmp_path))
  monkeypatch.setenv('VIT_NOTEBOOK_DATA_DIR', data_dir)
  monkeypatch.setenv('VIT_JAX_ROOT', ROOT)
  monkeypatch.setenv('VIT_JAX_SOURCE', ROOT)
  book = nbformat.read(os.path.join(ROOT, 'notebooks', f'{name}.ipynb'), as_version=4)
  nbclient.NotebookClient(book, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}}).execute()
  outputs = [o for cell in book.cells if cell.cell_type == 'code' for o in cell.get('outputs', [])]
  assert not [o for o in outputs if o.output_type == 'error']
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  assert 'working in' in text
  if name == 'analysis_figures':
    assert sum('image/png' in o.get('data', {}) for o in outputs) == 4  # The four figures were shown.
  if name == 'classify_and_attention':
    assert 'of these 16 test images right' in text and any('image/png' in o.get('data', {}) for o in outputs)
  if name == 'finetune_image_folder':
    assert 'fine-tuned test accuracy' in text


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_committed_notebook_shows_the_results_of_a_full_run(name):
  book = nbformat.read(os.path.join(ROOT, 'notebooks', f'{name}.ipynb'), as_version=4)
  code = [cell for cell in book.cells if cell.cell_type == 'code']
  assert all(cell.get('execution_count') for cell in code), 'a cell was not run: python notebooks/execute.py'
  outputs = [o for cell in code for o in cell.get('outputs', [])]
  assert not [o for o in outputs if o.output_type == 'error']
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  assert 'working in' in text
  figures = sum('image/png' in o.get('data', {}) for o in outputs)
  if name == 'analysis_figures':
    assert figures == 4
  if name == 'classify_and_attention':
    right = re.search(r'step \d+: (\d+)% of these 16 test images right', text)
    assert right and int(right[1]) >= 75 and figures >= 1  # A full run, not the tiny one.
  if name == 'finetune_image_folder':
    accuracy = re.search(r'fine-tuned test accuracy (\d\.\d+)', text)
    assert accuracy and float(accuracy[1]) > 0.9
