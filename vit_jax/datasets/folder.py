"""Your own images: a folder with one sub-folder per class, built into a tfds dataset on first use.

  --config.dataset=folder:/path/to/images

Layouts: `root/train/<class>/*.jpg` and `root/test/<class>/*.jpg` (the splits as given), or `root/<class>/*`
(every fifth image of each class, in sorted file order, is held out as `test`). Images are decoded once while
building (so an unreadable file fails then, naming it, not mid-training), converted to RGB and stored in the
tfds data_dir under a name derived from the folder's path; later runs read that. Rebuild after changing the
folder by deleting `<data_dir>/image_folder_*` (the log names it).
"""
import hashlib
import os
import re
import types
from typing import Dict, List, Tuple

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import errors

PREFIX = 'folder:'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
HELD_OUT_EVERY = 5


class FolderError(errors.DataError, ValueError):
  """The image folder cannot be used; the message says what is wrong and where."""


def _list_images(directory: str, skipped: Dict[str, List[str]]) -> List[str]:
  """The image files of `directory`, sorted; every other entry but sub-folders goes to `skipped[directory]`."""
  images, others = [], []
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(path):
      images.append(name)
    elif not os.path.isdir(path):  # Another format, a broken link, a stray file.
      others.append(name)
  if others:
    skipped[directory] = others
  return images


def _report_skipped(skipped: Dict[str, List[str]]) -> None:
  if not skipped:
    return
  shown = '; '.join(f'{directory}: {len(names)} ({", ".join(names[:3])}{", ..." if len(names) > 3 else ""})'
                    for directory, names in skipped.items())
  logging.warning('Skipped %d files that are not readable images (%s; broken links count too): %s.',
                  sum(map(len, skipped.values())), ', '.join(IMAGE_EXTENSIONS), shown)


def _class_dirs(directory: str) -> List[str]:
  return sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d)))


def scan(root: str) -> Tuple[Tuple[str, ...], Dict[str, List[Tuple[str, int]]]]:
  """Class names and, per split, (file path, label index) pairs; fails on empty classes or mismatched splits."""
  if not os.path.isdir(root):
    raise FolderError(f'Image folder {root!r} does not exist.')
  top = _class_dirs(root)
  if 'train' in top and 'test' in top:
    per_split = {split: os.path.join(root, split) for split in ('train', 'test')}
    classes = _class_dirs(per_split['train'])
    if _class_dirs(per_split['test']) != classes:
      raise FolderError(f'{root}/train and {root}/test must hold the same class folders; train has {classes}, '
                        f'test has {_class_dirs(per_split["test"])}.')
  else:
    per_split, classes = None, top
  if len(classes) < 2:
    raise FolderError(f'{root!r} needs one sub-folder per class (at least 2), e.g. {root}/cat/1.jpg and '
                      f'{root}/dog/1.jpg, or train/ and test/ folders laid out that way; found {classes}.')
  examples = {'train': [], 'test': []}
  skipped = {}
  try:  # The skipped files are listed whether the classes pass or not.
    for label, name in enumerate(classes):
      if per_split:
        for split, directory in per_split.items():
          files = _list_images(os.path.join(directory, name), skipped)
          if not files:
            raise FolderError(f'Class {name!r} has no images in {os.path.join(directory, name)} (looked for '
                              f'{", ".join(IMAGE_EXTENSIONS)}).')
          examples[split] += [(os.path.join(directory, name, f), label) for f in files]
      else:
        files = _list_images(os.path.join(root, name), skipped)
        if len(files) < 2:
          raise FolderError(f'Class {name!r} has {len(files)} image(s) in {os.path.join(root, name)}: each class '
                            f'needs at least 2 (one is held out for testing).')
        for i, f in enumerate(files):
          split = 'test' if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 or (i == len(files) - 1 and i < 4) else 'train'
          examples[split].append((os.path.join(root, name, f), label))
  finally:
    _report_skipped(skipped)
  return tuple(classes), examples


def _read_rgb(path: str) -> np.ndarray:
  try:
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
  except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
    raise FolderError(f'Cannot read the image {path}: {e.message.splitlines()[0]}. Remove or replace the '
                      f'file.') from None
  return image.numpy()


class _FolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the per-folder builders made by `builder_for`."""
  VERSION = tfds.core.Version('1.0.0')
  ROOT: str = ''

  def _info(self):
    classes, _ = scan(self.ROOT)
    return tfds.core.DatasetInfo(
        builder=self, description=f'Images of {self.ROOT}, one sub-folder per class.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(names=classes)}),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files.
    _, examples = scan(self.ROOT)
    return {split: self._generate_examples(pairs) for split, pairs in examples.items()}

  def _generate_examples(self, pairs):
    for index, (path, label) in enumerate(pairs):
      yield index, {'image': _read_rgb(path), 'label': label}


def builder_for(dataset: str, data_dir=None) -> tfds.core.DatasetBuilder:
  """The builder of `folder:/path`: a tfds builder named after the folder (so each folder has its own data)."""
  root = os.path.abspath(os.path.expanduser(dataset[len(PREFIX):]))
  slug = re.sub(r'[^a-z0-9]+', '_', os.path.basename(root).lower()).strip('_') or 'root'
  digest = hashlib.sha1(root.encode()).hexdigest()[:8]
  name = f'image_folder_{slug}_{digest}'
  class_name = ''.join(part.capitalize() for part in name.split('_'))
  builder_class = types.new_class(class_name, (_FolderBuilder,), {'skip_registration': True},
                                  lambda ns: ns.update(ROOT=root, name=name))
  return builder_class(data_dir=data_dir)
