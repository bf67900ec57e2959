"""Fine-tuning data from a user's image folder: built into a tfds dataset, read by the same pipeline."""
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_main
from vit_jax import input_pipeline
from vit_jax.datasets import folder


def _write_images(directory, count, value, rng):
  """PNG and JPEG files of varying sizes, mostly `value` (bright or dark): an easy two-class task."""
  os.makedirs(directory, exist_ok=True)
  for i in range(count):
    size = (int(rng.integers(12, 30)), int(rng.integers(12, 30)))
    pixels = np.clip(value + rng.normal(0, 20, (*size, 3)), 0, 255).astype(np.uint8)
    if i % 2:
      data = tf.io.encode_jpeg(pixels).numpy()
      name = f'{i}.jpg'
    else:
      data = tf.io.encode_png(pixels[..., :1] if i % 4 == 0 else pixels).numpy()  # Some grey PNGs too.
      name = f'{i}.png'
    with open(os.path.join(directory, name), 'wb') as f:
      f.write(data)


@pytest.mark.slow
def test_class_folders_with_a_held_out_fraction_train_through_the_main_job(tmp_path, data_dir):
  rng = np.random.default_rng(0)
  root = tmp_path / 'pets'
  _write_images(root / 'bright', 20, 200, rng)
  _write_images(root / 'dark', 20, 50, rng)
  (root / 'dark' / 'notes.txt').write_text('not an image: ignored')
  classes, examples = folder.scan(str(root))
  assert classes == ('bright', 'dark')
  assert len(examples['train']) == 32 and len(examples['test']) == 8  # Every fifth image of each class.

  builder = input_pipeline.get_builder(f'folder:{root}', data_dir)
  assert builder.info.splits['train'].num_examples == 32
  assert builder.info.features['image'].shape == (None, None, 3)
  result = run_main(tmp_path / 'run', '--config=configs/digits.py', f'--config.dataset=folder:{root}',
                    f'--config.data_dir={data_dir}', '--config.image_size=16', '--config.model.num_layers=1',
                    '--config.batch_size=8', '--config.eval_batch_size=8', '--config.total_steps=40',
                    '--config.lr=3e-3', '--config.warmup_steps=5')
  accuracy = float(result.stdout.split('Final test accuracy: ')[1].split()[0])
  assert f'/8 on folder:{root}:test' in result.stdout
  assert accuracy >= 0.75  # Bright vs dark is easy; chance is 0.5.


def test_train_and_test_folders_are_used_as_given(tmp_path, data_dir):
  rng = np.random.default_rng(1)
  for split, count in (('train', 6), ('test', 3)):
    for name, value in (('a', 30), ('b', 220), ('c', 120)):
      _write_images(tmp_path / 'imgs' / split / name, count, value, rng)
  builder = input_pipeline.get_builder(f'folder:{tmp_path / "imgs"}', data_dir)
  assert builder.info.features['label'].names == ['a', 'b', 'c']
  assert (builder.info.splits['train'].num_examples, builder.info.splits['test'].num_examples) == (18, 9)


def test_unreadable_files_and_empty_classes_get_clear_errors(tmp_path, data_dir):
  rng = np.random.default_rng(2)
  _write_images(tmp_path / 'broken' / 'x', 3, 10, rng)
  _write_images(tmp_path / 'broken' / 'y', 3, 240, rng)
  (tmp_path / 'broken' / 'y' / 'bad.jpg').write_bytes(b'this is not a jpeg')
  with pytest.raises(folder.FolderError, match=r'Cannot read the image .*broken/y/bad\.jpg'):
    input_pipeline.get_builder(f'folder:{tmp_path / "broken"}', data_dir)

  _write_images(tmp_path / 'empty' / 'x', 3, 10, rng)
  os.makedirs(tmp_path / 'empty' / 'y')
  with pytest.raises(folder.FolderError, match=r"Class 'y' has 0 image\(s\)"):
    input_pipeline.get_builder(f'folder:{tmp_path / "empty"}', data_dir)
  with pytest.raises(folder.FolderError, match='does not exist'):
    input_pipeline.get_builder(f'folder:{tmp_path / "nowhere"}', data_dir)
  _write_images(tmp_path / 'one' / 'only', 3, 10, rng)
  with pytest.raises(folder.FolderError, match='one sub-folder per class'):
    input_pipeline.get_builder(f'folder:{tmp_path / "one"}', data_dir)


def test_files_that_are_not_images_are_listed_and_a_class_left_empty_is_refused(tmp_path, caplog):
  rng = np.random.default_rng(0)
  root = tmp_path / 'pets'
  _write_images(root / 'bright', 4, 200, rng)
  _write_images(root / 'dark', 4, 50, rng)
  for name in ('a.webp', 'b.webp', 'c.heic', 'd.txt'):
    (root / 'dark' / name).write_bytes(b'x')
  os.symlink(root / 'gone.png', root / 'bright' / 'broken.png')  # A link to nothing.
  with caplog.at_level('WARNING'):
    classes, examples = folder.scan(str(root))
  assert classes == ('bright', 'dark') and len(examples['train']) + len(examples['test']) == 8
  message = caplog.text
  assert 'Skipped 5 files that are not readable images' in message
  assert f'{root}/bright: 1 (broken.png)' in message and f'{root}/dark: 4 (a.webp, b.webp, c.heic, ...)' in message
  # A class whose files are all skipped is refused, the skipped files listed first.
  for name in os.listdir(root / 'dark'):
    if name.endswith(('.png', '.jpg')):
      os.remove(root / 'dark' / name)
  caplog.clear()
  with caplog.at_level('WARNING'), pytest.raises(folder.FolderError, match="Class 'dark' has 0 image"):
    folder.scan(str(root))
  assert 'a.webp' in caplog.text
