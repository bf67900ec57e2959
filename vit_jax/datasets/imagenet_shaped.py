"""`imagenet_shaped`: synthetic JPEGs shaped like ImageNet's training images, to measure the input pipeline
at the cost ImageNet has (JPEG decoding dominates it: pixels per image and bytes per file), offline.

Sizes follow the shape of ImageNet's training set: three in four images have a long side of 500 px (landscape
500x375 and 500x333 most, then square and portrait), the rest are smaller or larger (up to 1600 px). Pixels
are smooth random colour fields with grain, JPEG quality 90: files of ~100 KB at 500x375, near ImageNet's
~110 KB mean. 1,000 classes, labels at random: for timing, not for learning.
"""
import io

import numpy as np
import tensorflow_datasets as tfds

NUM_CLASSES = 1000
# (share, (height, width) of a 500-px long side): the common shapes of ImageNet's training images.
COMMON_SHAPES = ((0.45, (375, 500)), (0.20, (333, 500)), (0.10, (500, 500)), (0.15, (500, 375)),
                 (0.10, (500, 333)))


def image_shape(rng: np.random.Generator) -> tuple:
  """(height, width) of one image: 75% a common 500-px shape, 15% smaller, 10% larger."""
  kind = rng.random()
  if kind < 0.75:
    shares, shapes = zip(*COMMON_SHAPES)
    return shapes[rng.choice(len(shapes), p=np.array(shares) / sum(shares))]
  long_side = int(rng.integers(150, 500) if kind < 0.9 else rng.integers(501, 1601))
  short_side = int(long_side * rng.uniform(0.6, 1.0))
  return (long_side, short_side) if rng.random() < 0.3 else (short_side, long_side)


def jpeg_bytes(rng: np.random.Generator, height: int, width: int) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top  (matplotlib's dependency; only when building)
  coarse = rng.integers(0, 256, (max(height // 24, 2), max(width // 24, 2), 3), dtype=np.uint8)
  pixels = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
  pixels += rng.normal(0.0, 16.0, pixels.shape)
  buffer = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, 'JPEG', quality=90)
  return buffer.getvalue()


class ImagenetShaped(tfds.core.GeneratorBasedBuilder):
  """Synthetic ImageNet-shaped JPEGs (see the module docstring); the config names the training images (200: a
  quick look, 2000: the benchmark's default)."""
  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=str(n), description=f'{n} training images')
                     for n in (2_000, 10_000, 200)]

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES)}),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager  # Made here, nothing to download.
    count = int(self.builder_config.name)
    return {'train': self._generate_examples(count, 0), 'validation': self._generate_examples(min(500, count // 4), 1)}

  def _generate_examples(self, count: int, seed: int):
    rng = np.random.default_rng(seed)
    for i in range(count):
      height, width = image_shape(rng)
      yield i, {'image': io.BytesIO(jpeg_bytes(rng, height, width)), 'label': int(rng.integers(NUM_CLASSES))}
