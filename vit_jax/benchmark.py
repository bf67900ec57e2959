"""Benchmarks measured on this machine; `--measure=compile` needs no data and runs no step.

  python -m vit_jax.benchmark --measure=compile --variants=ViT-B/16,ViT-L/16,ViT-H/14 --batch_per_device=8

`compile`: for each variant and each (remat, scan) setting, the real train step (Adam, 224px, 1000 classes)
is lowered from abstract shapes and compiled ahead of time; reported: compile time and the compiled step's
memory from `compiled.memory_analysis()` (temporaries = activations and workspace; arguments = state + batch).
"""
import itertools
import json
import time

from absl import app
from absl import flags
import jax

from vit_jax import config_lib
from vit_jax import train

_MEASURE = flags.DEFINE_enum('measure', 'compile', ['compile'], 'What to measure.')
_VARIANTS = flags.DEFINE_list('variants', ['ViT-B/16', 'ViT-L/16'], 'Model variants.')
_BATCH_PER_DEVICE = flags.DEFINE_integer('batch_per_device', 8, 'Batch size per device.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Image size.')
_REMAT = flags.DEFINE_list('remat', ['false', 'true'], 'remat settings to measure.')
_SCAN = flags.DEFINE_list('scan', ['false', 'true'], 'scan settings to measure.')
_JSON = flags.DEFINE_string('json', None, 'Also write the results to this JSON file.')


def measure_compile(variant: str, remat: bool, scan: bool, batch_per_device: int, image_size: int) -> dict:
  config = config_lib.base_config()
  config.model.name = variant
  config.model.remat, config.model.scan = remat, scan
  config.image_size = image_size
  mesh = train.make_mesh(config.mesh)
  config.batch_size = batch_per_device * mesh.devices.size
  run = train.setup(config, mesh, num_classes=1000, num_steps=100_000, channels=3)
  start = time.perf_counter()
  lowered = run.train_fn.lower(run.abstract_state, run.abstract_batch)
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  return dict(variant=variant, remat=remat, scan=scan, batch=config.batch_size, devices=mesh.devices.size,
              backend=jax.default_backend(), compile_s=round(seconds, 1),
              temp_gib=memory.temp_size_in_bytes / 2**30, argument_gib=memory.argument_size_in_bytes / 2**30)


def main(argv):
  del argv
  to_bool = lambda values: [v.lower() in ('1', 'true', 'yes') for v in values]
  results = []
  print(f'{"variant":10} {"remat":>5} {"scan":>5} {"batch":>5} {"compile s":>9} {"temp GiB":>9} {"args GiB":>9}')
  for variant, remat, scan in itertools.product(_VARIANTS.value, to_bool(_REMAT.value), to_bool(_SCAN.value)):
    result = measure_compile(variant, remat, scan, _BATCH_PER_DEVICE.value, _IMAGE_SIZE.value)
    results.append(result)
    print(f'{variant:10} {str(remat):>5} {str(scan):>5} {result["batch"]:5d} {result["compile_s"]:9.1f} '
          f'{result["temp_gib"]:9.2f} {result["argument_gib"]:9.2f}', flush=True)
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  app.run(main)
