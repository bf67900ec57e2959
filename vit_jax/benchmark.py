"""Benchmarks for BENCHMARKS.md: speed, compile time, memory and FLOP/s of our ViTs, side by side with timm's.

  python -m vit_jax.benchmark                                   # Ti/16, S/16, B/16; 224px; batch 8; fp32
  python -m vit_jax.benchmark --variants=ViT-B/16 --compare=timm --json=b16.json
  python -m vit_jax.benchmark --measure=compile --variants=ViT-B/16,ViT-L/16 --remat=false,true --scan=false,true

`--measure=speed` (default). For each variant, resolution and batch size, `inference` (forward pass, eval
mode) and `train` (our real train step: forward, backward, global-norm clipping, AdamW update, donated state)
are measured, each in a fresh worker process so that peak RSS is its own: compile time, median seconds of
`--repeats` timed calls after `--warmup` calls (every output blocked on), images/s, FLOPs per image from XLA's
`cost_analysis()` (multiply and add counted as two), achieved FLOP/s and its ratio to the machine's fp32
matmul peak (a large jitted matmul measured in the same run), XLA's compiled memory (`memory_analysis()`:
temporaries + arguments + outputs) and the process's peak RSS.

`--compare=timm` (needs the `torch` extra) measures timm's `VisionTransformer` on the same batch, resolution,
dtype and thread count, built from our weights through `vit_jax.timm_layout` so that both compute the same
function (the maximum logit difference is reported), and prints the ratios ours/theirs. timm's train step does
the same work as ours (cross-entropy, backward, clipping at norm 1, AdamW). `--compare=timm_compile` adds
timm under `torch.compile`.

`--measure=compile`: for each variant and (remat, scan) setting, the train step is lowered from abstract
shapes and compiled ahead of time, nothing runs: compile time and compiled memory.
"""
import itertools
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from vit_jax import errors  # absl only: safe before the torch/JAX import order matters.

_MEASURE = flags.DEFINE_enum('measure', 'speed', ['speed', 'compile'], 'What to measure.')
_VARIANTS = flags.DEFINE_list('variants', ['ViT-Ti/16', 'ViT-S/16', 'ViT-B/16'], 'Model variants.')
_IMAGE_SIZES = flags.DEFINE_list('image_sizes', ['224'], 'Image sizes.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['8'], 'Global batch sizes (speed).')
_MODES = flags.DEFINE_list('modes', ['inference', 'train'], 'What to time (speed): inference, train.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Activation/matmul dtype.')
_COMPARE = flags.DEFINE_list('compare', [], 'Also measure: timm (eager), timm_compile (torch.compile).')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per measurement (the median is reported).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed calls after compilation.')
_THREADS = flags.DEFINE_integer('threads', None, 'torch threads (default: the CPU count, as XLA uses).')
_REMAT = flags.DEFINE_list('remat', ['false'], 'remat settings to measure.')
_SCAN = flags.DEFINE_list('scan', ['false'], 'scan settings to measure.')
_BATCH_PER_DEVICE = flags.DEFINE_integer('batch_per_device', 8, 'Batch size per device (compile).')
_JSON = flags.DEFINE_string('json', None, 'Also write the results to this JSON file.')
# Internal: one measurement in this (fresh) process; the result is printed as a JSON line.
_WORKER = flags.DEFINE_string('worker', None, 'Internal: a JSON job description.')

RESULT_PREFIX = 'BENCHMARK_RESULT '


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux.


def _time_calls(call, repeats: int, warmup: int) -> float:
  """Median seconds of `repeats` calls after `warmup` calls; `call` must block until its result is ready."""
  for _ in range(warmup):
    call()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


# --------------------------------------------------------------------------------------------- JAX workers


def matmul_job(job: dict) -> dict:
  del job
  from vit_jax import flops  # pylint: disable=g-import-not-at-top  (JAX: only in the worker that runs it)
  return flops.matmul_peak()


def _config(job: dict):
  from vit_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config.model.name = job['variant']
  config.model.remat, config.model.scan = job.get('remat', False), job.get('scan', False)
  config.image_size = job['image_size']
  config.batch_size = job['batch']
  config.dtype = job['dtype']
  config.total_steps = 100_000  # Only the schedule's length (past the 10k warmup); nothing runs that long.
  return config


def _memory(compiled) -> dict:
  memory = compiled.memory_analysis()
  return dict(temp_gib=memory.temp_size_in_bytes / 2**30, argument_gib=memory.argument_size_in_bytes / 2**30,
              output_gib=memory.output_size_in_bytes / 2**30)


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


_COMPUTATION = re.compile(r'^(?:ENTRY )?%(\S+) \(.*\{$')
_LIBRARY_FUSION = re.compile(r'calls=%([\w.\-]+).*"kind":"__(\w+?)_fusion"')


def dot_kernels(hlo_text: str, platform: str) -> str:
  """What runs the matmuls of a compiled program, read from its optimized HLO: on CPU, the library of the
  fusion holding each dot ('ynn', 'onednn', 'xnn') or 'eigen' (XLA:CPU's own dot emitter and Eigen runtime);
  on GPU, 'cublas' (a cuBLAS custom call), 'triton' or 'xla'; on TPU the platform (one matrix unit, no
  library). Several kinds are joined with '+'."""
  if platform == 'tpu':
    return 'tpu'
  library = {}  # fused computation -> the library its fusion hands it to
  for line in hlo_text.splitlines():
    match = _LIBRARY_FUSION.search(line)
    if match:
      library[match[1]] = match[2]
  found, computation = set(), None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header[1]
    elif 'custom_call_target="__cublas' in line:
      found.add('cublas')
    elif re.search(r'= \S+ dot\(', line):
      kind = library.get(computation)
      found.add(kind if kind else ('eigen' if platform == 'cpu' else 'xla'))
  return '+'.join(sorted(found)) or 'none'


def jax_inference(job: dict) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  config = _config(job)
  model = models.from_config(config, num_classes=1000)
  images = np.random.default_rng(0).uniform(-1, 1, (job['batch'], job['image_size'], job['image_size'], 3))
  images = jnp.asarray(images, jnp.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])['params']
  # A random head (it starts at zero), so that the logits compared with timm's mean something.
  params['head']['kernel'] = 0.02 * jax.random.normal(jax.random.PRNGKey(1), params['head']['kernel'].shape)
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x))
  start = time.perf_counter()
  compiled = forward.lower(params, images).compile()
  compile_s = time.perf_counter() - start
  if job.get('exchange'):  # Hand the same weights, images and our logits to the timm workers.
    from vit_jax import timm_layout  # pylint: disable=g-import-not-at-top
    exchange = job['exchange']
    params_np = jax.tree.map(np.asarray, params)
    np.savez(os.path.join(exchange, 'weights.npz'), **timm_layout.state_dict(params_np))
    np.savez(os.path.join(exchange, 'io.npz'), images=np.asarray(images), logits=np.asarray(compiled(params, images)))
    with open(os.path.join(exchange, 'timm_kwargs.json'), 'w') as f:
      json.dump(timm_layout.timm_kwargs(timm_layout.describe(params_np), job['image_size']), f)
    return {}
  if job.get('flops_only'):
    return dict(flops=_flops(compiled))
  seconds = _time_calls(lambda: compiled(params, images).block_until_ready(), job['repeats'], job['warmup'])
  return dict(compile_s=compile_s, seconds=seconds, flops=_flops(compiled), **_memory(compiled),
              kernel=dot_kernels(compiled.as_text(), jax.default_backend()))


def jax_train(job: dict) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vit_jax import sharding  # pylint: disable=g-import-not-at-top
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  config = _config(job)
  mesh = sharding.make_mesh(config.mesh)
  run = train.setup(config, mesh, num_classes=1000, num_steps=100_000, channels=3)
  rng = np.random.default_rng(0)
  size = job['image_size']
  batch = sharding.to_global_batch({
      'image': rng.uniform(-1, 1, (job['batch'], size, size, 3)).astype(np.float32),
      'label': rng.integers(0, 1000, job['batch']).astype(np.int32)}, mesh)
  state = run.init_state(jax.random.PRNGKey(0))
  start = time.perf_counter()
  compiled = run.train_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  if job.get('flops_only'):
    return dict(flops=_flops(compiled))
  holder = [state]

  def step():
    holder[0], metrics = compiled(holder[0], batch)  # The state is donated: keep only the new one.
    jax.block_until_ready((holder[0], metrics))

  seconds = _time_calls(step, job['repeats'], job['warmup'])
  return dict(compile_s=compile_s, seconds=seconds, flops=_flops(compiled), **_memory(compiled),
              kernel=dot_kernels(compiled.as_text(), jax.default_backend()))


def jax_compile(job: dict) -> dict:
  """The train step compiled ahead of time from abstract shapes (nothing runs)."""
  from vit_jax import sharding  # pylint: disable=g-import-not-at-top
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  config = _config(job)
  mesh = sharding.make_mesh(config.mesh)
  config.batch_size = job['batch_per_device'] * mesh.devices.size
  run = train.setup(config, mesh, num_classes=1000, num_steps=100_000, channels=3)
  start = time.perf_counter()
  compiled = run.train_fn.lower(run.abstract_state, run.abstract_batch).compile()
  return dict(compile_s=time.perf_counter() - start, batch=config.batch_size, devices=mesh.devices.size,
              **_memory(compiled))


# -------------------------------------------------------------------------------------------- timm workers


def timm_run(job: dict) -> dict:
  """timm's VisionTransformer with our weights (inference) or the same architecture (train). Imports neither
  JAX nor TensorFlow: its peak RSS is timm's own."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
  threads = job['threads'] or os.cpu_count()
  torch.set_num_threads(threads)
  exchange = job['exchange']
  with open(os.path.join(exchange, 'timm_kwargs.json')) as f:
    kwargs = json.load(f)
  model = vision_transformer.VisionTransformer(**kwargs)
  with np.load(os.path.join(exchange, 'weights.npz')) as weights:
    model.load_state_dict({k: torch.from_numpy(weights[k]) for k in weights.files}, strict=True)
  with np.load(os.path.join(exchange, 'io.npz')) as io:
    images = torch.from_numpy(io['images']).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    our_logits = io['logits']
  dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[job['dtype']]
  result = dict(threads=threads)
  model.eval()
  with torch.inference_mode():
    logits = model(images).numpy()
  result['max_logit_diff'] = float(np.abs(logits - our_logits).max())
  result['max_logit'] = float(np.abs(our_logits).max())
  run_model = torch.compile(model) if job['compile'] else model
  start = time.perf_counter()
  if job['mode'] == 'inference':
    def call():
      with torch.inference_mode(), torch.autocast('cpu', dtype=dtype, enabled=dtype != torch.float32):
        run_model(images)
  else:
    model.train()
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, kwargs['num_classes'], images.shape[0]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.1)

    def call():
      with torch.autocast('cpu', dtype=dtype, enabled=dtype != torch.float32):
        loss = torch.nn.functional.cross_entropy(run_model(images), labels)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      optimizer.step()
      optimizer.zero_grad(set_to_none=True)
  call()  # The first call compiles under torch.compile.
  result['compile_s'] = time.perf_counter() - start
  result['seconds'] = _time_calls(call, job['repeats'], job['warmup'])
  return result


WORKERS = {'matmul': matmul_job, 'jax_inference': jax_inference, 'jax_train': jax_train,
           'jax_compile': jax_compile, 'timm': timm_run}


def run_worker(job: dict) -> dict:
  """Runs one job in a fresh process; returns its result with the process's peak RSS."""
  env = dict(os.environ)
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  proc = subprocess.run([sys.executable, '-m', 'vit_jax.benchmark', f'--worker={json.dumps(job)}'],
                        capture_output=True, text=True, env=env, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_PREFIX)]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f'Benchmark worker {job} failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
  return json.loads(lines[-1][len(RESULT_PREFIX):])


def _worker_main(job: dict) -> None:
  if job['kind'] != 'timm':
    from vit_jax import host_cpu  # pylint: disable=g-import-not-at-top
    host_cpu.setup()  # The host of the main job: one CPU device unless XLA_FLAGS says more.
  result = WORKERS[job['kind']](job)
  result['peak_rss_gib'] = _peak_rss_gib()
  print(RESULT_PREFIX + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------- driver


def _to_bool(values):
  return [v.lower() in ('1', 'true', 'yes') for v in values]


def measure_speed() -> list:
  peak = run_worker({'kind': 'matmul'})
  print(f'Machine: {peak["device_kind"]} ({peak["backend"]}, {peak["devices"]} device(s)), {os.cpu_count()} '
        f'CPUs; fp32 matmul {peak["size"]}^3: {peak["flops_per_s"] / 1e9:.1f} GFLOP/s (the peak below).')
  header = (f'{"variant":9} {"size":>4} {"batch":>5} {"mode":9} {"impl":12} {"kernel":8} {"img/s":>7} {"compile s":>9} '
            f'{"GFLOP/img":>9} {"GFLOP/s":>7} {"of peak":>7} {"XLA GiB":>7} {"RSS GiB":>7} {"ours/them":>9}')
  print(header)
  results = [dict(peak)]
  for variant, size, batch, remat, scan in itertools.product(
      _VARIANTS.value, map(int, _IMAGE_SIZES.value), map(int, _BATCH_SIZES.value), _to_bool(_REMAT.value),
      _to_bool(_SCAN.value)):
    with tempfile.TemporaryDirectory() as exchange:
      if _COMPARE.value:  # The timm workers (either mode) load our weights, images and logits from here.
        run_worker(dict(kind='jax_inference', variant=variant, image_size=size, batch=batch, dtype=_DTYPE.value,
                        exchange=exchange))
      for mode in _MODES.value:
        if mode not in ('inference', 'train'):
          raise app.UsageError(f'Unknown mode {mode!r}: choose inference and/or train.')
        job = dict(variant=variant, image_size=size, batch=batch, dtype=_DTYPE.value, remat=remat, scan=scan,
                   repeats=_REPEATS.value, warmup=_WARMUP.value, mode=mode)
        ours = run_worker({**job, 'kind': f'jax_{mode}'})
        if scan:  # XLA's cost analysis counts a loop body once: take the FLOPs of the unrolled twin.
          ours['flops'] = run_worker({**job, 'kind': f'jax_{mode}', 'scan': False, 'flops_only': True})['flops']
        flops_per_image = ours['flops'] / batch
        rows = [('vit_jax' + ('+scan' if scan else '') + ('+remat' if remat else ''), ours)]
        for impl in _COMPARE.value:
          if impl not in ('timm', 'timm_compile'):
            raise app.UsageError(f'Unknown --compare {impl!r}: choose timm and/or timm_compile.')
          rows.append((impl, run_worker({**job, 'kind': 'timm', 'exchange': exchange, 'threads': _THREADS.value,
                                         'compile': impl == 'timm_compile'})))
        for impl, result in rows:
          images_per_s = batch / result['seconds']
          flops_per_s = flops_per_image * images_per_s
          result.update(variant=variant, image_size=size, batch=batch, mode=mode, impl=impl,
                        dtype=_DTYPE.value, images_per_s=images_per_s, flops_per_image=flops_per_image,
                        flops_per_s=flops_per_s, of_peak=flops_per_s / peak['flops_per_s'])
          ratio = '' if impl.startswith('timm') else ' / '.join(
              f'{images_per_s / (batch / other["seconds"]):.2f}x' for name, other in rows[1:])
          xla = result.get('temp_gib', 0) + result.get('argument_gib', 0) + result.get('output_gib', 0)
          result.setdefault('kernel', 'torch')  # timm: PyTorch's CPU matmul (MKL or oneDNN, its choice).
          print(f'{variant:9} {size:4d} {batch:5d} {mode:9} {impl:12} {result["kernel"]:8} {images_per_s:7.2f} '
                f'{result["compile_s"]:9.1f} {flops_per_image / 1e9:9.2f} {flops_per_s / 1e9:7.1f} '
                f'{result["of_peak"]:7.1%} {(f"{xla:.2f}" if xla else "-"):>7} {result["peak_rss_gib"]:7.2f} '
                f'{ratio:>9}', flush=True)
          if 'max_logit_diff' in result:
            if result['max_logit_diff'] > 1e-3 * max(result['max_logit'], 1.0):
              raise RuntimeError(f'{impl} does not compute our function: logits differ by '
                                 f'{result["max_logit_diff"]:.2e} (largest logit {result["max_logit"]:.2e}).')
          results.append(result)
  return results


def measure_compile() -> list:
  results = []
  print(f'{"variant":10} {"remat":>5} {"scan":>5} {"batch":>5} {"compile s":>9} {"temp GiB":>9} {"args GiB":>9}')
  for variant, remat, scan in itertools.product(_VARIANTS.value, _to_bool(_REMAT.value), _to_bool(_SCAN.value)):
    job = dict(kind='jax_compile', variant=variant, remat=remat, scan=scan, image_size=int(_IMAGE_SIZES.value[0]),
               batch=_BATCH_PER_DEVICE.value, batch_per_device=_BATCH_PER_DEVICE.value, dtype=_DTYPE.value)
    result = {**job, **run_worker(job)}
    results.append(result)
    print(f'{variant:10} {str(remat):>5} {str(scan):>5} {result["batch"]:5d} {result["compile_s"]:9.1f} '
          f'{result["temp_gib"]:9.2f} {result["argument_gib"]:9.2f}', flush=True)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _WORKER.value:
    _worker_main(json.loads(_WORKER.value))
    return
  results = measure_speed() if _MEASURE.value == 'speed' else measure_compile()
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  errors.run(main)
