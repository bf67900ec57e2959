"""tf.data input pipeline over any tfds dataset: per-process shards, augmentation, batches for the devices.

Training order is a pure function of (seed, step): the shuffle is seeded, augmentations use stateless ops
keyed by the example's position in the stream, and a resumed run skips the examples already consumed before
any decoding: a cached dataset in memory; one read from storage only within its current epoch, each epoch
being one pass in an order seeded by (seed, epoch). So a run restarted from a checkpoint sees exactly the
batches an uninterrupted one would, at a cost that does not grow with the step.
"""
import dataclasses
import errno
import json
import math
import os
import re
import traceback
from typing import Iterator, Optional

import jax
from google.protobuf import json_format
from google.protobuf import message
import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax.datasets import embedded
from vit_jax.datasets import folder
from vit_jax import errors


class DatasetNotFound(errors.DataError):
  """A dataset is not prepared where we looked; the message says where and how to prepare it."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  channels: int


def get_builder(name: str, data_dir: Optional[str]) -> tfds.core.DatasetBuilder:
  """The tfds builder of `name`, prepared; embedded datasets are built from local files on first use."""
  if name in embedded.BUILDERS or name.startswith(folder.PREFIX):
    make = (lambda: folder.builder_for(name, data_dir)) if name.startswith(folder.PREFIX) else (
        lambda: embedded.BUILDERS[name](data_dir=data_dir))
    builder = make()
    if not builder.is_prepared():
      try:
        builder.download_and_prepare()
      except FileExistsError:
        # Several processes sharing a data_dir build at once; tfds writes to a temporary folder and renames
        # it, so the first rename wins and the others find the same dataset in place.
        builder = make()
        if not builder.is_prepared():
          raise
      except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR):
          raise
        raise errors.DataError(f'Cannot build the dataset {name!r} into {data_dir or "~/tensorflow_datasets"}: '
                               f'{e.strerror}. Give a --config.data_dir this user can write (it is built once, '
                               'then read).') from None
    return builder
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise DatasetNotFound(
        f'Unknown dataset {name!r}: neither one of ours ({", ".join(embedded.BUILDERS)}), nor an image folder '
        f'("folder:/path/to/images"), nor a tfds catalog name (see https://www.tensorflow.org/datasets/catalog).'
    ) from None  # tfds' error lists its whole catalogue.
  if not builder.is_prepared():
    raise DatasetNotFound(
        f'Dataset {name!r} is not prepared in {builder.data_dir}. This job never downloads: prepare it first, '
        f'e.g. `tfds build {name} --data_dir={data_dir or "~/tensorflow_datasets"}` (ImageNet needs its '
        f'archives placed in <data_dir>/downloads/manual first), then pass --config.data_dir=<data_dir>.')
  return builder


def damaged_dataset_error(error: BaseException, name: str, data_dir: Optional[str]) -> Optional[errors.DataError]:
  """A DataError naming the dataset and how to rebuild it, when `error` is TensorFlow or tfds failing on the
  files of a prepared dataset (a record altered or cut, a file missing, its metadata unreadable); else None."""
  root = data_dir or os.path.expanduser('~/tensorflow_datasets')
  if name in embedded.BUILDERS:
    factory = embedded.BUILDERS[name]
    folder_name = getattr(factory, 'func', factory).name  # A builder class, or a partial of one (a config).
  elif name.startswith(folder.PREFIX):
    folder_name = None  # Named after the image folder and a hash of its path (`folder.builder_for`).
  else:
    folder_name = name.split(':')[0].split('/')[0]
  where = os.path.join(root, folder_name) if folder_name else root
  tfds_frames = any('tensorflow_datasets' in frame.filename for frame in traceback.extract_tb(error.__traceback__))
  if isinstance(error, tf.errors.DataLossError):
    what = 'a record is altered or cut'
  elif isinstance(error, tf.errors.FailedPreconditionError) and re.search(
      r'expected to contain \d+ elements but contained only', str(error)):
    # A file cut between two records reads without error, but fewer records than the metadata counts (all
    # records have one size when they hold stored PNGs of one image size: half the file ends between two).
    what = 'a record is altered or cut'
  elif isinstance(error, tf.errors.NotFoundError) and root in str(error):
    what = 'a file is missing'
  elif tfds_frames and isinstance(error, (json.JSONDecodeError, json_format.ParseError, message.DecodeError)):
    what = 'its metadata cannot be read'
  else:
    return None
  if name in embedded.BUILDERS or name.startswith(folder.PREFIX):
    rebuild = 'rerun: this job builds it again from its source files'
  else:
    rebuild = f'prepare it again: `tfds build {name} --data_dir={root}`'
  # TensorFlow's text carries its op's internal names around the message: dropped.
  reason = re.sub(r'\{\{.*?\}\}\s*|\s*\[Op:[^\]]*\].*$', '', errors.one_line(error, 1000))[:200]
  return errors.DataError(f'The prepared dataset {name!r} is damaged: {what} ({reason}). '
                          f'Delete {where}{"" if folder_name else "/<its folder>"} and {rebuild}.')


def get_info(builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict) -> DatasetInfo:
  splits = builder.info.splits
  for split in (config.train_split, config.eval_split):
    if split.split('[')[0] not in splits:
      raise errors.DataError(f'Dataset {builder.name!r} has no split {split!r}; it has {", ".join(splits)}.')
  channels = builder.info.features['image'].shape[-1] or 3
  return DatasetInfo(num_classes=builder.info.features['label'].num_classes,
                     num_train_examples=splits[config.train_split].num_examples,
                     num_eval_examples=splits[config.eval_split].num_examples, channels=channels)


def _decoder(builder):
  """Decodes the image bytes that `SkipDecoding` left encoded (decoding after `skip` keeps resumes cheap)."""
  image_feature = builder.info.features['image']
  return lambda example: {'image': image_feature.decode_example(example['image']),
                          'label': tf.cast(example['label'], tf.int32)}


def _to_model_range(image):
  return tf.cast(image, tf.float32) / 127.5 - 1.0  # [0, 255] -> [-1, 1], as the published models expect.


def crop_window(shape, seed, pp: ml_collections.ConfigDict):
  """(begin, size) of an inception crop (random area and aspect ratio) of an image of `shape` [h, w, c]."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed, min_object_covered=0.0,
      aspect_ratio_range=(3 / 4, 4 / 3), area_range=(pp.crop_min_area, 1.0), use_image_if_no_bounding_boxes=True)
  return begin, size


def decode_jpeg_crop(data, seed, pp: ml_collections.ConfigDict, channels: int):
  """Decodes only the crop window of a JPEG, at a fraction of the work of decoding it all and cropping, with the
  same window (it depends on the image's size and `seed` alone) and the same pixels but in its left column,
  where subsampled colour is interpolated from neighbours outside the window (a few of 255 levels)."""
  begin, size = crop_window(tf.image.extract_jpeg_shape(data), seed, pp)
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  return tf.ensure_shape(tf.image.decode_and_crop_jpeg(data, window, channels=channels), (None, None, channels))


def preprocess_train(example, seed, pp: ml_collections.ConfigDict, image_size: int, decode=None):
  """Inception crop (random area and aspect ratio, resized back) and random horizontal flip, in the pixel range
  (`_to_model_range` follows, on whole batches). With `decode`
  (the image feature, whose `decode_example` turns bytes into pixels), `example['image']` is still encoded:
  with `pp.decode_and_crop`, a JPEG then has only its crop decoded."""
  image = example['image']
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if decode is not None and pp.inception_crop and pp.decode_and_crop:
    data, channels = image, decode.shape[-1]

    def decode_then_crop():  # PNG and other formats.
      pixels = tf.ensure_shape(decode.decode_example(data), (None, None, channels))
      return tf.slice(pixels, *crop_window(tf.shape(pixels), crop_seed, pp))

    image = tf.cond(tf.io.is_jpeg(data), lambda: decode_jpeg_crop(data, crop_seed, pp, channels),
                    decode_then_crop)
  else:
    if decode is not None:
      image = decode.decode_example(image)
    if pp.inception_crop:
      image = tf.slice(image, *crop_window(tf.shape(image), crop_seed, pp))
  image = _resize(image, image_size)
  if pp.flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return {'image': image, 'label': example['label']}


def passes_decoded_images_through(pp: ml_collections.ConfigDict, stored_shape, image_size: int) -> bool:
  """Whether `preprocess_train` returns a decoded image of `stored_shape` as it is (no crop, no flip, no
  resize), so that the pipeline can skip it. A step added to `preprocess_train` belongs here too (a test turns
  on each of `pp`'s switches and checks)."""
  return not pp.inception_crop and not pp.flip and _has_size(stored_shape, image_size)


def _has_size(shape, image_size: int) -> bool:
  return tuple(shape[:2]) == (image_size, image_size)  # An unknown (None) side is not the size.


def _resize(image, image_size: int):
  if _has_size(image.shape, image_size):
    return image  # Already the size (e.g. uncropped 28x28 Fashion-MNIST): resizing would cost, not change.
  return tf.image.resize(image, (image_size, image_size), method='bilinear', antialias=True)


def preprocess_eval(example, image_size: int):
  image = _resize(example['image'], image_size)
  return {'image': _to_model_range(image), 'label': example['label']}


def _read_split(builder, split: str, shuffle_seed: Optional[int]):
  """This process's shard of `split`, images still encoded."""
  process_split = tfds.split_for_jax_process(split)
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, interleave_cycle_length=16)
  return builder.as_dataset(split=process_split, shuffle_files=shuffle_seed is not None,
                            read_config=read_config, decoders={'image': tfds.decode.SkipDecoding()})


def train_dataset(builder, config: ml_collections.ConfigDict, local_batch_size: int,
                  start_step: int = 0) -> Iterator[dict]:
  """Endless numpy batches of this process's training shard, starting at global step `start_step`."""
  seed = config.seed + 1_000_003 * jax.process_index()
  ds = _read_split(builder, config.train_split, shuffle_seed=seed)
  decode = _decoder(builder)
  consumed = start_step * local_batch_size
  if config.cache_data:
    # In memory: a resumed run skips what it consumed without reading or decoding anything.
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).cache()
    ds = ds.shuffle(config.shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    # Position in the stream: keys the augmentation randomness, and lets a resumed run skip what it consumed.
    ds = ds.enumerate().skip(consumed)
  else:
    # From storage: each epoch's order is a function of (seed, epoch) alone, so a resumed run starts at its
    # epoch and skips (reads) only what it consumed of that one, whatever the step.
    per_epoch = builder.info.splits[tfds.split_for_jax_process(config.train_split)].num_examples
    first_epoch, offset = divmod(consumed, per_epoch)

    def epoch(index):
      order = ds.shuffle(config.shuffle_buffer, seed=tf.constant(seed, tf.int64) * 1_000_003 + index,
                         reshuffle_each_iteration=False)
      return order.enumerate(start=index * per_epoch)

    ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch).skip(offset)

  def prepare(index, example):
    if not config.cache_data:  # Decoded in preprocess_train, which may decode just the crop.
      example = {'image': example['image'], 'label': tf.cast(example['label'], tf.int32)}
    return preprocess_train(example, tf.stack([tf.constant(seed, tf.int64), index]), config.pp,
                            config.image_size, decode=None if config.cache_data else builder.info.features['image'])

  if not (config.cache_data and passes_decoded_images_through(config.pp, builder.info.features['image'].shape,
                                                              config.image_size)):
    # Otherwise there is nothing to do per image, and tf.data's per-element map would cost more CPU than the
    # rest of the pipeline (BENCHMARKS.md, "Input pipeline of a dataset held in memory").
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def to_model_input(*index_and_batch):  # The stream's positions are still there when `prepare` did not run.
    batch = index_and_batch[-1]
    return {**batch, 'image': _to_model_range(batch['image'])}  # Once per batch: the same values.

  ds = ds.batch(local_batch_size, drop_remainder=True).map(to_model_input).prefetch(tf.data.AUTOTUNE)
  return iter(tfds.as_numpy(_untuned(ds) if config.cache_data else ds))


def _untuned(ds: tf.data.Dataset) -> tf.data.Dataset:
  """`ds` without tf.data's autotuning, for a dataset held in memory, which needs none (as many images/s
  without). Autotuning's background thread can hold up the destruction of its iterator, the end of a run,
  for up to a minute (TensorFlow 2.21: BENCHMARKS.md, "Start-up")."""
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options)


def eval_batches_per_process(num_examples: int, local_batch_size: int) -> int:
  """Every process runs the same number of eval steps (a collective step needs all of them)."""
  return math.ceil(math.ceil(num_examples / jax.process_count()) / local_batch_size)


def eval_dataset(builder, config: ml_collections.ConfigDict, local_batch_size: int,
                 num_examples: int) -> tf.data.Dataset:
  """This process's eval shard padded to whole batches; 'mask' is 0 on padding, so metrics stay exact."""
  ds = _read_split(builder, config.eval_split, shuffle_seed=None)
  decode = _decoder(builder)
  ds = ds.map(lambda ex: {**preprocess_eval(decode(ex), config.image_size), 'mask': tf.constant(1.0)},
              num_parallel_calls=tf.data.AUTOTUNE)
  if config.cache_data:
    ds = ds.cache()
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros((config.image_size, config.image_size, ds.element_spec['image'].shape[-1])),
      'label': tf.constant(0, tf.int32), 'mask': tf.constant(0.0)}).repeat()
  num_batches = eval_batches_per_process(num_examples, local_batch_size)
  ds = ds.concatenate(padding).take(num_batches * local_batch_size)
  ds = ds.batch(local_batch_size).prefetch(tf.data.AUTOTUNE)
  return _untuned(ds) if config.cache_data else ds


def process_batch_size(global_batch_size: int) -> int:
  """This process's share of the global batch (`sharding.check_batch_size` checks it splits over devices)."""
  return global_batch_size // jax.process_count()
