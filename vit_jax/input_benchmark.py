"""Input pipeline at ImageNet shape: how many host cores does it take to feed the chips?

  python -m vit_jax.input_benchmark --data_dir=/tmp/tensorflow_datasets

Builds `imagenet_shaped` once (synthetic JPEGs of ImageNet's sizes, `datasets/imagenet_shaped.py`), then times
the training pipeline itself (`input_pipeline.train_dataset`: read, decode, inception crop, flip, resize to
224, batch) in fresh processes pinned to 1 core and to all cores, with the fused decode-and-crop
(`config.pp.decode_and_crop`) on and off, and each stage alone on 1 core. From the 1-core rate it derives the
cores a TPU host needs for ViT-B/16 and ViT-L/16 at a given MFU (model FLOPs: `flops.py`).
"""
import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

from vit_jax import errors

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'tfds data_dir (imagenet_shaped is built there once).')
_DATASET = flags.DEFINE_string('dataset', 'imagenet_shaped', 'Dataset to time (any prepared tfds dataset).')
_BATCH = flags.DEFINE_integer('batch', 128, 'Batch size of the pipeline.')
_SECONDS = flags.DEFINE_float('seconds', 20.0, 'Seconds timed per setting (after a warm-up).')
_MFU = flags.DEFINE_float('mfu', 0.5, 'Model FLOP utilisation assumed for the chips to be fed.')
_STAGES = flags.DEFINE_integer('stages', 300, 'JPEGs to time each stage alone on (1 core); 0: skip.')
_OUT = flags.DEFINE_string('out', None, 'Optional JSON file for the results.')
_WORKER = flags.DEFINE_string('worker', None, 'Internal: one timing job (JSON), run in a pinned process.')

# Published per-host facts of TPU VMs (Cloud TPU docs): chips per host, physical cores per host (vCPUs / 2),
# and dense bf16 TFLOP/s per chip (the `flops.PEAK_TFLOPS` table).
TPU_HOSTS = (('TPU v4', 4, 120), ('TPU v5e', 8, 112))


def time_pipeline(job: dict) -> dict:
  """Images/s of the training pipeline of `job` in this process (pinned by its parent)."""
  from vit_jax import config_lib  # pylint: disable=g-import-not-at-top  (TensorFlow: only in the worker)
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config.dataset, config.data_dir, config.image_size = job['dataset'], job['data_dir'], 224
  config.shuffle_buffer = 1_000
  config.pp.decode_and_crop = job['fused']
  builder = input_pipeline.get_builder(config.dataset, config.data_dir)
  batches = input_pipeline.train_dataset(builder, config, job['batch'])
  for _ in range(3):  # Warm-up: the threads start and the shuffle buffer fills.
    next(batches)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < job['seconds']:
    count += next(batches)['image'].shape[0]
  seconds = time.perf_counter() - start
  return dict(job, images_per_s=count / seconds, cores_used=len(os.sched_getaffinity(0)))


def time_stages(job: dict) -> dict:
  """Images/s of each stage alone on the first `job['images']` training images, one image at a time: where a
  core's time goes."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from vit_jax import config_lib  # pylint: disable=g-import-not-at-top
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  builder = input_pipeline.get_builder(job['dataset'], job['data_dir'])
  split = f'train[:{job["images"]}]'
  encoded = [ex['image'] for ex in builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()})]
  pp = config_lib.base_config().pp
  seed = tf.constant([0, 1])
  window = lambda data: input_pipeline.crop_window(tf.image.extract_jpeg_shape(data), seed, pp)
  fused = lambda data: input_pipeline.decode_jpeg_crop(data, seed, pp, 3)
  stages = {
      'decode whole': lambda data: tf.io.decode_jpeg(data, channels=3),
      'crop window only': window,
      'decode the crop only (fused)': fused,
      'fused + resize to 224, antialiased (ours)': lambda data: tf.image.resize(fused(data), (224, 224),
                                                                               antialias=True),
      'fused + resize to 224, not antialiased': lambda data: tf.image.resize(fused(data), (224, 224)),
  }
  rates = {}
  for name, stage in stages.items():
    stage = tf.function(stage)
    stage(encoded[0])
    start = time.perf_counter()
    for data in encoded:
      stage(data)
    rates[name] = len(encoded) / (time.perf_counter() - start)
  return dict(job, stages=rates, cores_used=len(os.sched_getaffinity(0)))


def run_pinned(job: dict, cores: int) -> dict:
  """Runs `job` in a fresh process limited to the first `cores` CPUs (tf.data sizes its threads to them)."""
  allowed = sorted(os.sched_getaffinity(0))[:cores]
  command = [sys.executable, '-m', 'vit_jax.input_benchmark', f'--worker={json.dumps(job)}']
  result = subprocess.run(command, capture_output=True, text=True, check=False,
                          preexec_fn=lambda: os.sched_setaffinity(0, allowed))
  if result.returncode != 0:
    raise RuntimeError(f'The timing worker failed:\n{result.stderr[-3000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _WORKER.value:
    job = json.loads(_WORKER.value)
    print(json.dumps(time_stages(job) if job.get('stages') else time_pipeline(job)))
    return
  all_cores = len(os.sched_getaffinity(0))
  results = []
  print(f'{_DATASET.value}, batch {_BATCH.value}, 224x224, {_SECONDS.value:.0f} s per setting:')
  for cores in sorted({1, all_cores}):
    for fused in (False, True):
      job = dict(dataset=_DATASET.value, data_dir=_DATA_DIR.value, batch=_BATCH.value, seconds=_SECONDS.value,
                 fused=fused)
      results.append(dict(run_pinned(job, cores), cores=cores))
      print(f'  {cores} core(s), decode-and-crop {"fused" if fused else "separate"}: '
            f'{results[-1]["images_per_s"]:.0f} images/s', flush=True)
  stages = {}
  if _STAGES.value:
    stages = run_pinned(dict(dataset=_DATASET.value, data_dir=_DATA_DIR.value, images=_STAGES.value, stages=True),
                        1)['stages']
    print(f'Stages alone, 1 core, {_STAGES.value} JPEGs one at a time:')
    for name, rate in stages.items():
      print(f'  {name}: {rate:.0f} images/s')
  per_core = max(r['images_per_s'] for r in results if r['cores'] == 1 and r['fused'])
  print(f'Cores a TPU host needs at {_MFU.value:.0%} MFU, at {per_core:.0f} images/s per core (fused):')
  needs = []
  from vit_jax import config_lib  # pylint: disable=g-import-not-at-top
  from vit_jax import flops  # pylint: disable=g-import-not-at-top
  peaks = dict(flops.PEAK_TFLOPS)
  for variant in ('ViT-B/16', 'ViT-L/16'):
    config = config_lib.base_config()
    config.model.name = variant
    train_flops = flops.train_flops_per_image(config, 1000, 3)
    for host, chips, host_cores in TPU_HOSTS:
      images_per_s = chips * peaks[host] * 1e12 * _MFU.value / train_flops
      cores = images_per_s / per_core
      needs.append(dict(variant=variant, host=host, chips=chips, host_cores=host_cores,
                        images_per_s_per_host=images_per_s, cores_needed=cores))
      print(f'  {variant} on a {host} host ({chips} chips, {host_cores} cores): {images_per_s:.0f} images/s '
            f'-> {cores:.0f} cores ({cores / host_cores:.0%} of the host)')
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump({'pipeline': results, 'stages': stages, 'needs': needs, 'mfu': _MFU.value}, f, indent=1)


if __name__ == '__main__':
  errors.run(main)
