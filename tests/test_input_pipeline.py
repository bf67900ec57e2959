"""The embedded tfds datasets and the tf.data pipeline, on real data built on disk."""
import gzip
import io
import os

import numpy as np
import pytest

from conftest import load_config
from vit_jax import config_lib
from vit_jax import input_pipeline
from vit_jax.datasets import embedded
from vit_jax.datasets import imagenet_shaped


def _digits_config(data_dir, **overrides):
  config = load_config('digits.py')
  config.data_dir = data_dir
  config.update(overrides)
  return config


def test_digits_build_into_a_tfds_dataset_with_stratified_splits(data_dir):
  builder = input_pipeline.get_builder('embedded_digits', data_dir)
  assert builder.is_prepared()
  assert os.path.isdir(os.path.join(data_dir, 'embedded_digits', '1.0.0'))
  info = input_pipeline.get_info(builder, _digits_config(data_dir))
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples, info.channels) == (10, 1442, 355, 1)
  examples = list(builder.as_dataset(split='test').as_numpy_iterator())
  # Every stored image is an original one, pixel for pixel (the builder writes its own PNGs).
  images, labels = embedded.read_digits('test')
  originals = {(image.tobytes(), int(label)) for image, label in zip(images, labels)}
  assert all((ex['image'].tobytes(), int(ex['label'])) in originals for ex in examples)
  labels = np.array([ex['label'] for ex in examples])
  # Stratified: every class keeps a fifth of its ~180 examples for the test split.
  counts = np.bincount(labels, minlength=10)
  assert counts.min() >= 34 and counts.max() <= 37, counts


@pytest.mark.slow
@pytest.mark.skipif(not any(os.path.exists(d) for d in embedded.FASHION_MNIST_DIRS),
                    reason='dataset-fashion-mnist is not installed (CI installs it)')
def test_fashion_mnist_builds_from_the_debian_files(data_dir):
  builder = input_pipeline.get_builder('embedded_fashion_mnist', data_dir)
  config = load_config('default.py')
  info = input_pipeline.get_info(builder, config)
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (10, 60_000, 10_000)
  # The stored examples are the original ones, labels included (tfds may store them in another order).
  images, labels = embedded.read_fashion_mnist('test')
  originals = {(image.tobytes(), int(label)) for image, label in zip(images, labels)}
  for example in builder.as_dataset(split='test').take(50).as_numpy_iterator():
    assert example['image'].shape == (28, 28, 1)
    assert (example['image'].tobytes(), int(example['label'])) in originals


@pytest.mark.parametrize('shape', [(28, 28, 1), (5, 7, 3), (1, 1, 1)])
def test_encoded_png_decodes_to_the_same_pixels_in_tensorflow_and_pil(shape):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  data = embedded.encode_png(pixels)
  np.testing.assert_array_equal(tf.io.decode_png(data, channels=shape[-1]).numpy(), pixels)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))).reshape(shape), pixels)


def test_missing_fashion_mnist_files_name_the_install_command(tmp_path, monkeypatch):
  monkeypatch.setattr(embedded, 'FASHION_MNIST_DIRS', (str(tmp_path),))
  with pytest.raises(embedded.MissingDataError, match='apt-get install dataset-fashion-mnist'):
    input_pipeline.get_builder('embedded_fashion_mnist', str(tmp_path / 'tfds'))


def test_truncated_idx_file_is_reported(tmp_path):
  path = tmp_path / 'bad-images-idx3-ubyte.gz'
  with gzip.open(path, 'wb') as f:
    f.write(b'\0\0\x08\x03' + np.array([10, 28, 28], '>i4').tobytes() + bytes(100))
  with pytest.raises(ValueError, match='truncated'):
    embedded.read_idx(str(path))


def test_missing_tfds_dataset_says_where_it_looked_and_how_to_prepare(tmp_path):
  with pytest.raises(input_pipeline.DatasetNotFound, match=r"'cifar10' is not prepared in .*tfds build cifar10"):
    input_pipeline.get_builder('cifar10', str(tmp_path))
  with pytest.raises(input_pipeline.DatasetNotFound, match='Unknown dataset'):
    input_pipeline.get_builder('no_such_dataset_anywhere', str(tmp_path))


def test_train_batches_are_augmented_in_range_and_resumable(data_dir):
  config = _digits_config(data_dir, image_size=16)
  config.pp.inception_crop = True
  config.pp.flip = True
  builder = input_pipeline.get_builder(config.dataset, data_dir)
  stream = input_pipeline.train_dataset(builder, config, local_batch_size=32)
  batches = [next(stream) for _ in range(5)]
  images = batches[0]['image']
  assert images.shape == (32, 16, 16, 1) and images.dtype == np.float32
  assert batches[0]['label'].dtype == np.int32
  assert images.min() >= -1.0 and images.max() <= 1.0 and images.min() < -0.9 and images.max() > 0.9
  # The same seed gives the same stream; a stream started at step 3 continues where step 3 would be.
  again = input_pipeline.train_dataset(builder, config, local_batch_size=32)
  np.testing.assert_array_equal(next(again)['image'], images)
  resumed = input_pipeline.train_dataset(builder, config, local_batch_size=32, start_step=3)
  resumed_batch = next(resumed)
  np.testing.assert_array_equal(resumed_batch['image'], batches[3]['image'])
  np.testing.assert_array_equal(resumed_batch['label'], batches[3]['label'])
  # Augmentation: the same example differs between epochs (train split of 1442 is seen ~once per 45 batches).
  config.pp.inception_crop = config.pp.flip = False
  plain = next(input_pipeline.train_dataset(builder, config, local_batch_size=32))
  assert not np.array_equal(plain['image'], images)


def test_unaugmented_cached_batches_are_the_stored_images_each_once_in_the_model_range(data_dir):
  # Cached, no crop or flip, stored at the model's size (the digits' 8x8): no per-image map runs, and the
  # conversion to [-1, 1] runs on whole batches.
  import collections  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  config = _digits_config(data_dir)
  builder = input_pipeline.get_builder(config.dataset, data_dir)
  stored = collections.Counter(
      ((example['image'].astype(np.float32) / np.float32(127.5) - np.float32(1.0)).tobytes(), int(example['label']))
      for example in tfds.as_numpy(builder.as_dataset(split='train')))
  stream = input_pipeline.train_dataset(builder, config, local_batch_size=32)
  batches = [next(stream) for _ in range(45)]  # 1,440 of the 1,442 examples: all from the first epoch.
  assert batches[0]['image'].dtype == np.float32 and batches[0]['image'].shape == (32, 8, 8, 1)
  streamed = collections.Counter((image.tobytes(), int(label)) for batch in batches
                                 for image, label in zip(batch['image'], batch['label']))
  assert sum(streamed.values()) == 1440 and not streamed - stored  # Exactly stored values, none twice.
  resumed = next(input_pipeline.train_dataset(builder, config, local_batch_size=32, start_step=7))
  np.testing.assert_array_equal(resumed['image'], batches[7]['image'])


def test_decoded_images_skip_the_per_image_step_only_where_it_would_change_nothing():
  # Each of the augmentation's switches on alone, at the stored size and another: where the pipeline would
  # skip `preprocess_train`, it returns the image as it is (a new step it does not know of fails here).
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  image = np.random.default_rng(0).integers(0, 256, (28, 28, 1), dtype=np.uint8)
  example = {'image': tf.constant(image), 'label': tf.constant(3)}
  switches = [name for name, value in config_lib.base_config().pp.items() if isinstance(value, bool)]
  assert {'inception_crop', 'flip'} <= set(switches)
  skipped = 0
  for switched_on in [None, *switches]:
    pp = config_lib.base_config().pp
    for name in switches:
      pp[name] = name == switched_on
    for image_size in (28, 32):
      if input_pipeline.passes_decoded_images_through(pp, image.shape, image_size):
        skipped += 1
        for seed in range(4):
          out = input_pipeline.preprocess_train(example, tf.constant([seed, 0], tf.int64), pp, image_size)
          np.testing.assert_array_equal(out['image'].numpy(), image, err_msg=f'{switched_on} on')
  assert skipped >= 2  # At least: no switch on, and decode_and_crop alone (it acts only on encoded images).


def test_a_stream_read_from_storage_resumes_in_its_epoch_with_the_same_batches(data_dir):
  # Not cached: each epoch is one pass in an order of its own, and a resumed stream starts in its epoch (the
  # digits' 1,442 training examples: step 50 of 32 is 158 examples into the second epoch).
  config = _digits_config(data_dir, image_size=8)
  config.cache_data = False
  builder = input_pipeline.get_builder(config.dataset, data_dir)
  stream = input_pipeline.train_dataset(builder, config, local_batch_size=32)
  batches = [next(stream) for _ in range(91)]  # Two epochs (2,884 examples) and then some.
  for step in (1, 50):
    resumed = next(input_pipeline.train_dataset(builder, config, local_batch_size=32, start_step=step))
    np.testing.assert_array_equal(resumed['image'], batches[step]['image'])
    np.testing.assert_array_equal(resumed['label'], batches[step]['label'])
  # Each epoch holds every example once (by label counts), in another order than the epoch before.
  labels = np.concatenate([b['label'] for b in batches])
  first, second = labels[:1442], labels[1442:2884]
  assert np.array_equal(np.bincount(first, minlength=10), np.bincount(second, minlength=10))
  assert not np.array_equal(first, second)


def test_eval_dataset_covers_every_example_once_with_padding_masked(data_dir):
  config = _digits_config(data_dir)
  builder = input_pipeline.get_builder(config.dataset, data_dir)
  batches = list(input_pipeline.eval_dataset(builder, config, local_batch_size=100, num_examples=355)
                 .as_numpy_iterator())
  assert len(batches) == 4
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == 355 and np.all(mask[:355] == 1) and np.all(mask[355:] == 0)
  labels = np.concatenate([b['label'] for b in batches])[:355]
  expected = np.array([ex['label'] for ex in builder.as_dataset(split='test').as_numpy_iterator()])
  np.testing.assert_array_equal(np.sort(labels), np.sort(expected))


def _encoded(pixels, image_format):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return (tf.io.encode_jpeg(pixels, quality=90) if image_format == 'jpeg' else tf.io.encode_png(pixels)).numpy()


@pytest.mark.parametrize('image_format', ['jpeg', 'png'])
def test_decoding_only_the_crop_gives_the_pixels_of_decoding_all_then_cropping(image_format):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  feature = tfds.features.Image(shape=(None, None, 3))
  rng = np.random.default_rng(0)
  config = config_lib.base_config()  # ImageNet's preprocessing: inception crop and flip.
  config.image_size = 64
  assert config.pp.inception_crop
  fused, separate = config.pp.copy_and_resolve_references(), config.pp.copy_and_resolve_references()
  fused.decode_and_crop, separate.decode_and_crop = True, False
  differ = 0
  for i in range(12):
    height, width = imagenet_shaped.image_shape(rng)
    data = tf.constant(imagenet_shaped.jpeg_bytes(rng, height, width) if image_format == 'jpeg' else
                       _encoded(rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8), 'png'))
    seed = tf.constant([3, i], tf.int64)
    example = {'image': data, 'label': tf.constant(1, tf.int32)}
    ours = input_pipeline.preprocess_train(example, seed, fused, config.image_size, decode=feature)['image']
    theirs = input_pipeline.preprocess_train(example, seed, separate, config.image_size, decode=feature)['image']
    # Equal but in the crop's left column (the first or, flipped, the last): at that edge a JPEG's subsampled
    # colour is interpolated from neighbours only the full decode reads (a few of 255 levels).
    gap = np.abs(ours.numpy() - theirs.numpy())
    assert gap[:, 1:-1].max() == 0 and gap.max() <= 8, gap.max()
    if image_format == 'png':  # Decoded whole either way.
      assert gap.max() == 0
    other_seed = input_pipeline.preprocess_train(example, seed + 1, fused, config.image_size, decode=feature)
    differ += not np.array_equal(other_seed['image'].numpy(), ours.numpy())
  assert differ >= 10  # The crop is random: the comparison is not between two constant outputs.


def test_imagenet_shaped_sizes_follow_imagenet():
  rng = np.random.default_rng(1)
  shapes = np.array([imagenet_shaped.image_shape(rng) for _ in range(4000)])
  assert 0.72 < np.mean(shapes.max(axis=1) == 500) < 0.78
  assert 0.3 < np.mean((shapes[:, 0] == 375) & (shapes[:, 1] == 500)) < 0.4  # 500x375 landscape, the most common.
  assert 330 < shapes[:, 0].mean() < 450 and 380 < shapes[:, 1].mean() < 500
  sizes = [len(imagenet_shaped.jpeg_bytes(rng, 375, 500)) for _ in range(5)]
  assert 80_000 < np.mean(sizes) < 140_000  # ImageNet's JPEGs average ~110 KB.
