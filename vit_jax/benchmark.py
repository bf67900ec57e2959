"""Benchmarks for BENCHMARKS.md: speed, compile time, memory and FLOP/s of our ViTs, side by side with timm's.

  python -m vit_jax.benchmark                                   # Ti/16, S/16, B/16; 224px; batch 8; fp32
  python -m vit_jax.benchmark --variants=ViT-B/16 --compare=timm --json=b16.json
  python -m vit_jax.benchmark --variants=ViT-B/16,configs/default.py --cpu_matmul=xla,onednn --compare=timm --rounds=3
  python -m vit_jax.benchmark --measure=compile --variants=ViT-B/16,ViT-L/16 --remat=false,true --scan=false,true

`--measure=speed` (default). For each variant, resolution and batch size, `inference` (forward pass, eval
mode) and `train` (our real train step: forward, backward, global-norm clipping, AdamW update, donated state)
are measured, each in a fresh worker process so that peak memory is its own: compile time, median seconds of
`--repeats` timed calls after `--warmup` calls (every output blocked on), images/s, model FLOPs per image
(`flops.py`: the lowered forward pass, which counts the matmuls that a compiled GPU module hides in library
calls; a train step is three forwards), achieved FLOP/s and MFU against the device's peak (`flops.py`: the
vendor's dense bf16 figure for an accelerator; on CPU a large jitted matmul measured in the same run), XLA's
compiled memory (`memory_analysis()`: temporaries + arguments + outputs), the device's peak bytes in use (an
accelerator's allocator; the process's peak RSS on CPU) and the kernel that ran the matmuls (read from the
compiled HLO). Rows are named by what ran them: `vit_jax[onednn]` / `vit_jax[xla]` on CPU (its matmul
library, `--cpu_matmul=xla,onednn` measures both), `vit_jax[gpu]` or `vit_jax[tpu]` on an accelerator.
`--rounds=N` measures every row N times, the rows taking turns, and reports the median and the spread. A
config file as the variant (`configs/default.py`) is measured at its own image size, batch and dataset shape.

`--compare=timm` (needs the `torch` extra) measures timm's `VisionTransformer` on the same device as ours (CUDA
when JAX runs on a GPU), batch, resolution, dtype (autocast) and thread count, built from our weights through
`vit_jax.timm_layout` so that both compute the same function (the maximum logit difference is reported), and
prints the ratios ours/theirs. timm's train step does the same work as ours (cross-entropy, backward, clipping
at norm 1, AdamW, fused on CUDA); its memory is `torch.cuda.max_memory_allocated` on CUDA.
`--compare=timm_compile` adds timm under `torch.compile`. `--json` and `--table` are rewritten after every
row, and `--worker_timeout` records a row that runs too long as such: a run cut short keeps what finished.
`launch/gpu_benchmark.sh` is the prepared comparison on one GPU.

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
_VARIANTS = flags.DEFINE_list('variants', ['ViT-Ti/16', 'ViT-S/16', 'ViT-B/16'],
                              'Model variants, or config files (configs/default.py: its model, image size, batch '
                              'size and dataset shape; --image_sizes/--batch_sizes do not apply to it).')
_IMAGE_SIZES = flags.DEFINE_list('image_sizes', ['224'], 'Image sizes.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['8'], 'Global batch sizes (speed).')
_MODES = flags.DEFINE_list('modes', ['inference', 'train'], 'What to time (speed): inference, train.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Activation/matmul dtype.')
_COMPARE = flags.DEFINE_list('compare', [], 'Also measure: timm (eager), timm_compile (torch.compile).')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per measurement (their median is its time).')
_ROUNDS = flags.DEFINE_integer('rounds', 1, 'Measurements per row, the rows of a mode taking turns (alternating): '
                               'the median over rounds is reported with the min-max spread.')
_CPU_MATMULS = flags.DEFINE_list('cpu_matmul', ['onednn'], 'config.cpu_matmul settings to measure (CPU): onednn, xla.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed calls after compilation.')
_THREADS = flags.DEFINE_integer('threads', None, 'torch threads (default: the CPU count, as XLA uses).')
_REMAT = flags.DEFINE_list('remat', ['false'], 'remat settings to measure.')
_SCAN = flags.DEFINE_list('scan', ['false'], 'scan settings to measure.')
_BATCH_PER_DEVICE = flags.DEFINE_integer('batch_per_device', 8, 'Batch size per device (compile).')
_JSON = flags.DEFINE_string('json', None, 'Also write the results to this JSON file.')
_TABLE = flags.DEFINE_string('table', None, 'Also write the speed rows as a Markdown table to this file.')
_WORKER_TIMEOUT = flags.DEFINE_integer('worker_timeout', None, 'Seconds a worker may take before its row is '
                                       'recorded as timed out (default: no limit).')
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
  """The machine: a large matmul measured, and the peak MFU is taken of (per process: all local devices)."""
  del job
  import jax  # pylint: disable=g-import-not-at-top  (JAX: only in the worker that runs it)
  from vit_jax import flops  # pylint: disable=g-import-not-at-top
  measured = flops.matmul_peak()
  per_device = flops.peak_flops_per_device()
  on_cpu = jax.default_backend() == 'cpu'
  return dict(measured, peak_flops_per_s=measured['flops_per_s'] if on_cpu or per_device is None
              else per_device * jax.local_device_count(),
              peak_source='measured fp32 matmul' if on_cpu or per_device is None else 'dense bf16, spec sheet')


def _is_config_file(variant: str) -> bool:
  return variant.endswith('.py')


def _config(job: dict):
  from vit_jax import config_lib  # pylint: disable=g-import-not-at-top
  if _is_config_file(job['variant']):
    config = config_lib.load_config_file(job['variant'])
  else:
    config = config_lib.base_config()
    config.model.name = job['variant']
  config.model.remat, config.model.scan = job.get('remat', False), job.get('scan', False)
  config.image_size = job['image_size']
  config.batch_size = job['batch']
  config.dtype = job['dtype']
  config.cpu_matmul = job.get('cpu_matmul', 'onednn')
  config.total_steps = 100_000  # Only the schedule's length (past the 10k warmup); nothing runs that long.
  return config


def _memory(compiled) -> dict:
  memory = compiled.memory_analysis()
  return dict(temp_gib=memory.temp_size_in_bytes / 2**30, argument_gib=memory.argument_size_in_bytes / 2**30,
              output_gib=memory.output_size_in_bytes / 2**30)


def _model_flops_per_image(job: dict, config) -> float:
  """Model FLOPs of one image (`flops.py`, from the lowered module: right on every backend)."""
  from vit_jax import flops  # pylint: disable=g-import-not-at-top
  count = flops.train_flops_per_image if job['mode'] == 'train' else flops.forward_flops_per_image
  return count(config, job['classes'], job['channels'])


def _device_memory() -> dict:
  """The device's peak bytes in use so far, where its allocator reports them (GPU, TPU; not the CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.local_devices()[0].memory_stats() or {}
  return {'device_peak_gib': stats['peak_bytes_in_use'] / 2**30} if 'peak_bytes_in_use' in stats else {}


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
  from vit_jax import host_cpu  # pylint: disable=g-import-not-at-top
  config = _config(job)
  if job.get('exchange'):
    config.dtype = 'float32'  # The logits timm's (float32) must give: the same function, to round-off.
  model = models.from_config(config, num_classes=job['classes'])
  size = job['image_size']
  images = np.random.default_rng(0).uniform(-1, 1, (job['batch'], size, size, job['channels']))
  images = jnp.asarray(images, jnp.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])['params']
  # A random head (it starts at zero), so that the logits compared with timm's mean something.
  params['head']['kernel'] = 0.02 * jax.random.normal(jax.random.PRNGKey(1), params['head']['kernel'].shape)
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x),
                    compiler_options=host_cpu.compiler_options(config.cpu_matmul))
  start = time.perf_counter()
  compiled = forward.lower(params, images).compile()
  compile_s = time.perf_counter() - start
  if job.get('exchange'):  # Hand the same weights, images and our logits to the timm workers.
    from vit_jax import timm_layout  # pylint: disable=g-import-not-at-top
    exchange = job['exchange']
    import torch  # pylint: disable=g-import-not-at-top  (untimed: this job only hands over the model)
    torch.save(timm_layout.create_model(jax.tree.map(np.asarray, params), job['image_size']),
               os.path.join(exchange, 'timm_model.pt'))
    np.savez(os.path.join(exchange, 'io.npz'), images=np.asarray(images), logits=np.asarray(compiled(params, images)))
    return {}
  seconds = _time_calls(lambda: compiled(params, images).block_until_ready(), job['repeats'], job['warmup'])
  return dict(compile_s=compile_s, seconds=seconds, flops_per_image=_model_flops_per_image(job, config),
              **_memory(compiled), **_device_memory(), backend=jax.default_backend(),
              kernel=dot_kernels(compiled.as_text(), jax.default_backend()))


def jax_train(job: dict) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vit_jax import sharding  # pylint: disable=g-import-not-at-top
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  config = _config(job)
  mesh = sharding.make_mesh(config.mesh)
  run = train.setup(config, mesh, num_classes=job['classes'], num_steps=100_000, channels=job['channels'])
  rng = np.random.default_rng(0)
  size = job['image_size']
  batch = sharding.to_global_batch({
      'image': rng.uniform(-1, 1, (job['batch'], size, size, job['channels'])).astype(np.float32),
      'label': rng.integers(0, job['classes'], job['batch']).astype(np.int32)}, mesh)
  state = run.init_state(jax.random.PRNGKey(0))
  start = time.perf_counter()
  compiled = run.train_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  holder = [state]

  def step():
    holder[0], metrics = compiled(holder[0], batch)  # The state is donated: keep only the new one.
    jax.block_until_ready((holder[0], metrics))

  seconds = _time_calls(step, job['repeats'], job['warmup'])
  return dict(compile_s=compile_s, seconds=seconds, flops_per_image=_model_flops_per_image(job, config),
              **_memory(compiled), **_device_memory(), backend=jax.default_backend(),
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
  """timm's model of our architecture (`timm_layout.create_model`, pickled by the JAX worker) with our weights,
  inference or train step, on `job['device']` ('cpu' or 'cuda'). Imports neither JAX nor TensorFlow: its peak
  memory is timm's own."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  device = torch.device(job.get('device', 'cpu'))
  on_cuda = device.type == 'cuda'
  if on_cuda and not torch.cuda.is_available():
    raise errors.UserError('JAX runs on a GPU but this torch has no CUDA: install a CUDA build of torch to '
                           'compare with timm on the same device.')
  threads = job['threads'] or os.cpu_count()
  torch.set_num_threads(threads)
  exchange = job['exchange']
  model = torch.load(os.path.join(exchange, 'timm_model.pt'), weights_only=False)  # Our own file, just written.
  with np.load(os.path.join(exchange, 'io.npz')) as io:
    images = torch.from_numpy(io['images']).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    our_logits = io['logits']
  model, images = model.to(device), images.to(device)
  dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[job['dtype']]
  synchronize = torch.cuda.synchronize if on_cuda else (lambda: None)
  result = dict(threads=threads, device=device.type)
  model.eval()
  with torch.inference_mode():
    logits = model(images).float().cpu().numpy()
  result['max_logit_diff'] = float(np.abs(logits - our_logits).max())
  result['max_logit'] = float(np.abs(our_logits).max())
  run_model = torch.compile(model) if job['compile'] else model
  autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
  if on_cuda:
    torch.cuda.reset_peak_memory_stats(device)
  start = time.perf_counter()
  if job['mode'] == 'inference':
    def call():
      with torch.inference_mode(), autocast():
        run_model(images)
      synchronize()
  else:
    model.train()
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, our_logits.shape[-1], images.shape[0]))
    labels = labels.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.1,
                                  fused=on_cuda)

    def call():
      with autocast():
        loss = torch.nn.functional.cross_entropy(run_model(images), labels)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      optimizer.step()
      optimizer.zero_grad(set_to_none=True)
      synchronize()
  call()  # The first call compiles under torch.compile.
  result['compile_s'] = time.perf_counter() - start
  result['seconds'] = _time_calls(call, job['repeats'], job['warmup'])
  if on_cuda:
    result['device_peak_gib'] = torch.cuda.max_memory_allocated(device) / 2**30
  return result


WORKERS = {'matmul': matmul_job, 'jax_inference': jax_inference, 'jax_train': jax_train,
           'jax_compile': jax_compile, 'timm': timm_run}


class WorkerTimeout(Exception):
  """A worker ran past --worker_timeout."""


def run_worker(job: dict, timeout=None) -> dict:
  """Runs one job in a fresh process; returns its result with the process's peak RSS."""
  env = dict(os.environ)
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  try:
    proc = subprocess.run([sys.executable, '-m', 'vit_jax.benchmark', f'--worker={json.dumps(job)}'],
                          capture_output=True, text=True, env=env, check=False, timeout=timeout)
  except subprocess.TimeoutExpired as e:
    raise WorkerTimeout(f'{job["kind"]} {job.get("variant", "")} {job.get("mode", "")}: no result within '
                        f'{timeout} s') from e
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


def _shapes(variant: str) -> list:
  """(image size, batch, channels, classes) rows of a variant: the flags' sizes for a named variant (ImageNet's
  3 channels and 1000 classes), a config file's own settings and dataset shape for a config file."""
  if not _is_config_file(variant):
    return [(size, batch, 3, 1000) for size, batch in itertools.product(map(int, _IMAGE_SIZES.value),
                                                                         map(int, _BATCH_SIZES.value))]
  from vit_jax import config_lib  # pylint: disable=g-import-not-at-top
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow: driver only)
  from vit_jax.datasets import embedded  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config_file(variant)
  # The dataset's declared features (nothing is read or built): channels and classes.
  with tempfile.TemporaryDirectory() as data_dir:
    builder = (embedded.BUILDERS[config.dataset](data_dir=data_dir) if config.dataset in embedded.BUILDERS
               else input_pipeline.tfds.builder(config.dataset, data_dir=data_dir))
    features = builder.info.features
    return [(config.image_size, config.batch_size, features['image'].shape[-1] or 3,
             features['label'].num_classes)]


def _spread(values: list) -> str:
  number = lambda v: f'{v:.0f}' if v >= 100 else f'{v:.3g}'
  return f'{number(min(values))}-{number(max(values))}' if len(values) > 1 else ''


def measure_speed() -> list:
  peak = run_worker({'kind': 'matmul'})
  backend = peak['backend']
  print(f'Machine: {peak["device_kind"]} ({backend}, {peak["devices"]} device(s)), {os.cpu_count()} CPUs; '
        f'matmul {peak["size"]}^3: {peak["flops_per_s"] / 1e12:.3g} TFLOP/s; MFU of '
        f'{peak["peak_flops_per_s"] / 1e12:.4g} TFLOP/s ({peak["peak_source"]}).')
  header = (f'{"variant":10} {"size":>4} {"batch":>5} {"mode":9} {"impl":20} {"kernel":11} {"img/s":>8} '
            f'{"spread":>11} {"compile s":>9} {"GFLOP/img":>9} {"TFLOP/s":>8} {"MFU":>6} {"XLA GiB":>7} '
            f'{"peak GiB":>8} {"ours/them":>9}')
  print(header)
  for impl in _COMPARE.value:
    if impl not in ('timm', 'timm_compile'):
      raise app.UsageError(f'Unknown --compare {impl!r}: choose timm and/or timm_compile.')
  for mode in _MODES.value:
    if mode not in ('inference', 'train'):
      raise app.UsageError(f'Unknown mode {mode!r}: choose inference and/or train.')
  for cpu_matmul in _CPU_MATMULS.value:
    if cpu_matmul not in ('onednn', 'xla'):
      raise app.UsageError(f'Unknown --cpu_matmul {cpu_matmul!r}: choose onednn and/or xla.')
  results = [dict(peak)]
  for variant, remat, scan in itertools.product(_VARIANTS.value, _to_bool(_REMAT.value), _to_bool(_SCAN.value)):
    for size, batch, channels, classes in _shapes(variant):
      shape = dict(variant=variant, image_size=size, batch=batch, channels=channels, classes=classes,
                   dtype=_DTYPE.value)
      with tempfile.TemporaryDirectory() as exchange:
        if _COMPARE.value:  # The timm workers (either mode) load our weights, images and logits from here.
          run_worker(dict(kind='jax_inference', exchange=exchange, **shape), _WORKER_TIMEOUT.value)
        for mode in _MODES.value:
          results += _measure_rows(dict(shape, remat=remat, scan=scan, repeats=_REPEATS.value,
                                        warmup=_WARMUP.value, mode=mode), exchange, peak)
          _write_outputs(results)
  return results


def row_jobs(job: dict, exchange: str, backend: str, cpu_matmuls, compare, threads=None) -> list:
  """(row name, worker job) of one mode of one shape: ours under each CPU matmul library (one row off the CPU,
  named by the backend), then each --compare implementation on the device JAX runs on (CUDA for a GPU)."""
  name = 'vit_jax' + ('+scan' if job['scan'] else '') + ('+remat' if job['remat'] else '')
  rows = [(f'{name}[{cpu_matmul if backend == "cpu" else backend}]',
           {**job, 'kind': f'jax_{job["mode"]}', 'cpu_matmul': cpu_matmul})
          for cpu_matmul in (cpu_matmuls if backend == 'cpu' else cpu_matmuls[:1])]
  device = 'cuda' if backend == 'gpu' else 'cpu'
  return rows + [(impl, {**job, 'kind': 'timm', 'exchange': exchange, 'threads': threads, 'device': device,
                         'compile': impl == 'timm_compile'}) for impl in compare]


def turns(rows: list, rounds: int) -> list:
  """The order rows are measured in: each round measures every row once, so drift falls on all alike."""
  return [row for _ in range(rounds) for row in rows]


def _measure_rows(job: dict, exchange: str, peak: dict) -> list:
  """One mode of one shape: ours under each CPU matmul library and each --compare implementation, taking turns
  for --rounds rounds (so that a machine's drift falls on all of them alike)."""
  rows = row_jobs(job, exchange, peak['backend'], _CPU_MATMULS.value, _COMPARE.value, _THREADS.value)
  measured = {impl: [] for impl, _ in rows}
  failed = {}
  for impl, worker_job in turns(rows, _ROUNDS.value):
    if impl in failed:
      continue
    try:
      measured[impl].append(run_worker(worker_job, _WORKER_TIMEOUT.value))
    except WorkerTimeout as e:
      failed[impl] = str(e)
  batch = job['batch']
  ours = [impl for impl, _ in rows if impl.startswith('vit_jax')]
  flops_per_image = next((runs[0]['flops_per_image'] for impl, runs in measured.items() if impl in ours and runs),
                         None)
  speeds = {impl: statistics.median(batch / r['seconds'] for r in runs) for impl, runs in measured.items() if runs}
  variant = os.path.basename(job['variant']) if _is_config_file(job['variant']) else job['variant']
  results = []
  for impl, runs in measured.items():
    if not runs:
      print(f'{variant:10} {job["image_size"]:4d} {batch:5d} {job["mode"]:9} {impl:20} {failed[impl]}',
            flush=True)
      results.append(dict(variant=job['variant'], image_size=job['image_size'], batch=batch, mode=job['mode'],
                          impl=impl, dtype=job['dtype'], timed_out=failed[impl]))
      continue
    result = dict(runs[len(runs) // 2])  # Memory, compile time and logit check of one of its runs.
    images_per_s = speeds[impl]
    flops_per_s = flops_per_image * images_per_s if flops_per_image else None
    result.update(variant=job['variant'], image_size=job['image_size'], batch=batch, mode=job['mode'], impl=impl,
                  dtype=job['dtype'], images_per_s=images_per_s, rounds=[batch / r['seconds'] for r in runs],
                  peak_rss_gib=max(r['peak_rss_gib'] for r in runs), flops_per_image=flops_per_image,
                  flops_per_s=flops_per_s, mfu=flops_per_s / peak['peak_flops_per_s'] if flops_per_s else None)
    result.setdefault('kernel', 'torch')  # timm: PyTorch's matmul (MKL/oneDNN on CPU, cuBLAS on CUDA).
    ratio = ' / '.join(f'{images_per_s / speeds[other]:.2f}x' for other in speeds if other not in ours)
    ratio = ratio if impl in ours else ''
    xla = result.get('temp_gib', 0) + result.get('argument_gib', 0) + result.get('output_gib', 0)
    peak_gib = result.get('device_peak_gib', result['peak_rss_gib'])
    print(f'{variant:10} {job["image_size"]:4d} {batch:5d} {job["mode"]:9} {impl:20} '
          f'{result["kernel"]:11} {images_per_s:8.2f} {_spread(result["rounds"]):>11} {result["compile_s"]:9.1f} '
          f'{(flops_per_image or 0) / 1e9:9.2f} {(flops_per_s or 0) / 1e12:8.3f} {result["mfu"] or 0:6.1%} '
          f'{(f"{xla:.2f}" if xla else "-"):>7} {peak_gib:8.2f} {ratio:>9}', flush=True)
    if 'max_logit_diff' in result and result['max_logit_diff'] > _LOGIT_AGREEMENT * max(
        result['max_logit'], 1.0):
      raise RuntimeError(f'{impl} does not compute our function: logits differ by {result["max_logit_diff"]:.2e} '
                         f'(largest logit {result["max_logit"]:.2e}).')
    results.append(result)
  return results


# How far timm's logits may be from ours (both float32, relative to the largest, at least 1) before the
# comparison is refused: two float32 kernels differ by round-off, orders of magnitude below this.
_LOGIT_AGREEMENT = 1e-3


def markdown_table(results: list) -> str:
  """The speed rows as a Markdown table (what BENCHMARKS.md shows)."""
  lines = ['| variant | size | batch | dtype | mode | impl | kernel | images/s | compile s | GFLOP/img | TFLOP/s | '
           'MFU | XLA GiB | peak GiB |', '|' + '---|' * 14]
  for r in results:
    if 'impl' not in r:
      continue
    if 'timed_out' in r:
      lines.append(f'| {r["variant"]} | {r["image_size"]} | {r["batch"]} | {r["dtype"]} | {r["mode"]} | '
                   f'{r["impl"]} | {r["timed_out"]} |' + ' |' * 7)
      continue
    xla = r.get('temp_gib', 0) + r.get('argument_gib', 0) + r.get('output_gib', 0)
    lines.append(f'| {r["variant"]} | {r["image_size"]} | {r["batch"]} | {r["dtype"]} | {r["mode"]} | {r["impl"]} | '
                 f'{r["kernel"]} | {r["images_per_s"]:,.1f} | {r["compile_s"]:.1f} | '
                 f'{(r["flops_per_image"] or 0) / 1e9:.2f} | {(r["flops_per_s"] or 0) / 1e12:.3f} | '
                 f'{r["mfu"] or 0:.1%} | {f"{xla:.2f}" if xla else "-"} | '
                 f'{r.get("device_peak_gib", r["peak_rss_gib"]):.2f} |')
  return '\n'.join(lines) + '\n'


def _write_outputs(results: list) -> None:
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(results, f, indent=1)
  if _TABLE.value:
    with open(_TABLE.value, 'w') as f:
      f.write(markdown_table(results))


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
  _write_outputs(results)


if __name__ == '__main__':
  errors.run(main)
