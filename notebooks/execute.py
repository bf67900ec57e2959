"""Runs the notebooks at full settings and saves them with their outputs, so that they show their results
(figures, accuracies) without running:

  python notebooks/execute.py                       # all of them
  python notebooks/execute.py analysis_figures      # one

Needs the `test` extra (nbclient, ipykernel). Each notebook trains what it needs from scratch in a temporary
folder (a few minutes on 2 CPU cores for all three); data comes from tfds' default data_dir. A notebook that
fails is left unchanged on disk.
"""
import os
import sys
import tempfile

import nbclient
import nbformat

NOTEBOOK_DIR = os.path.dirname(os.path.abspath(__file__))
NOTEBOOKS = ('classify_and_attention', 'finetune_image_folder', 'analysis_figures', 'transfer_small_dataset')


def execute(name: str) -> None:
  path = os.path.join(NOTEBOOK_DIR, f'{name}.ipynb')
  book = nbformat.read(path, as_version=4)
  with tempfile.TemporaryDirectory(prefix=f'vit_notebook_{name}_') as work:
    # Full settings: the tiny switch of the test suite is off; the repository's configs are used.
    os.environ.pop('VIT_NOTEBOOK_TINY', None)
    os.environ['VIT_NOTEBOOK_DIR'] = work
    os.environ['VIT_JAX_ROOT'] = os.path.dirname(NOTEBOOK_DIR)
    nbclient.NotebookClient(book, timeout=1800, kernel_name='python3',
                            resources={'metadata': {'path': NOTEBOOK_DIR}}).execute()
  clean(book, work)
  nbformat.write(book, path)
  print(f'{path}: executed, outputs saved.', flush=True)


def clean(book, work: str) -> None:
  """Keeps what a reader wants to see (printed results, figures); drops the log and progress bars that
  TensorFlow, tfds and absl write to stderr, and the temporary folder's name (not worth a diff each run)."""
  for cell in book.cells:
    if cell.cell_type != 'code':
      continue
    kept = []
    for output in cell.get('outputs', []):
      if output.get('output_type') == 'stream':
        if output.get('name') == 'stderr':
          continue
        lines = [line for line in output['text'].splitlines(keepends=True) if not line.startswith('\x1b[')]
        output['text'] = ''.join(lines).replace(work, '<temporary folder>')
        if not output['text']:
          continue
      kept.append(output)
    cell['outputs'] = kept


def main(names) -> None:
  unknown = set(names) - set(NOTEBOOKS)
  if unknown:
    raise SystemExit(f'Unknown notebooks {sorted(unknown)}; there are {", ".join(NOTEBOOKS)}.')
  for name in names or NOTEBOOKS:
    execute(name)


if __name__ == '__main__':
  main(sys.argv[1:])
