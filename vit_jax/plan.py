"""Plans a run on a TPU slice before it is paid for: compiles the real train and eval steps for the slice on
this host (no TPU needed: libtpu compiles for any topology, `pip install -e '.[tpu]'`) and prints, per device,
the memory needed against the chip's HBM, the step's FLOPs, HBM bytes and collectives, a roofline bound on the
step time with the images/s and MFU it allows; a config that does not fit gets the cheapest setting of the
project's levers (scan, fsdp, gradient accumulation, remat) that does.

  python -m vit_jax.plan --config configs/vit_imagenet.py:L/16 --topology v4-64 --config.dtype=bfloat16
  python -m vit_jax.plan --config configs/vit_imagenet.py:H/14 --topology v5litepod-64 --config.dtype=bfloat16 \
      --config.model.scan=true --config.model.remat=true --config.mesh.fsdp=2

Exit 0: fits as configured. Exit 2 (one line): does not fit (naming the setting that does, or that none
does), an unknown topology, a batch the devices do not divide.
"""
import dataclasses
import json
import math
import re
import time
from typing import Dict, List, Optional, Tuple

from absl import app
from absl import flags
from ml_collections import config_flags

GIB = 1024**3
# What the TPU runtime keeps for itself is not in the compiled module's figures; a plan within 95% of HBM fits.
USABLE_HBM = 0.95
COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
# Relative cost of each lever, for ordering the settings tried (each is compiled; the first that fits wins):
# remat recomputes the forward pass (a third more FLOPs); accumulation splits the batch into smaller matmuls and
# gathers fsdp shards once per micro-batch; a larger fsdp adds gathers that overlap the compute.
LEVER_COST = dict(remat=4 / 3, accum_doubling=0.08, fsdp_doubling=0.03)


@dataclasses.dataclass
class Settings:
  fsdp: int
  scan: bool
  remat: bool
  accum_steps: int

  def flags(self) -> str:
    return (f'--config.mesh.fsdp={self.fsdp} --config.model.scan={self.scan} --config.model.remat={self.remat} '
            f'--config.accum_steps={self.accum_steps}')

  def cost(self, base: 'Settings') -> float:
    cost = LEVER_COST['remat'] if self.remat and not base.remat else 1.0
    cost *= 1 + LEVER_COST['accum_doubling'] * math.log2(self.accum_steps / base.accum_steps)
    return cost * (1 + LEVER_COST['fsdp_doubling'] * math.log2(self.fsdp / base.fsdp))


def settings_of(config) -> Settings:
  return Settings(fsdp=int(config.mesh.get('fsdp', 1)), scan=bool(config.model.scan),
                  remat=bool(config.model.remat), accum_steps=int(config.accum_steps))


def with_settings(config, settings: Settings):
  config = config.copy_and_resolve_references()
  config.mesh.fsdp, config.mesh.data = settings.fsdp, -1
  config.model.scan, config.model.remat = settings.scan, settings.remat
  config.accum_steps = settings.accum_steps
  return config


# --- Reading the compiled module -------------------------------------------------------------------------

_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 'bf16': 2, 'f16': 2, 's16': 2,
                'u16': 2, 'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8, 'c64': 8, 'c128': 16}
_ARRAY = re.compile(r'\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]')
_COLLECTIVE = re.compile(r'= (.*?) (' + '|'.join(COLLECTIVES) + r')(?:-start)?\(')
_CALLEE_KEYS = re.compile(r'\b(calls|to_apply|body|condition|called_computations|branch_computations)='
                          r'(\{[^}]*\}|%[\w.\-]+)')


def array_bytes(shapes: str) -> int:
  """Bytes of the arrays an HLO type names (a tuple's elements summed; layouts ignored)."""
  total = 0
  for dtype, dims in _ARRAY.findall(re.sub(r'\{[^{}]*\}', '', shapes)):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
  return total


def _computations(hlo_text: str) -> Dict[str, List[str]]:
  computations, name = {}, None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith('{'):
      name = line.split()[1 if line.startswith('ENTRY') else 0].lstrip('%')
      computations[name] = []
    elif name and line.startswith('}'):
      name = None
    elif name:
      computations[name].append(line)
  return computations


def _trip_count(condition: str, computations: Dict[str, List[str]]) -> int:
  """A scan's loop count: the integer constant its condition compares the counter with (searched through the
  fusions it calls); 1 when there is no single one."""
  seen, todo, constants = set(), [condition], set()
  while todo:
    name = todo.pop()
    if name in seen or name not in computations:
      continue
    seen.add(name)
    for line in computations[name]:
      constants.update(int(c) for c in re.findall(r's32\[\](?:\{[^}]*\})? constant\((\d+)\)', line))
      todo.extend(callee for _, group in _CALLEE_KEYS.findall(line) for callee in re.findall(r'%([\w.\-]+)', group))
  constants.discard(0)
  return constants.pop() if len(constants) == 1 else 1


def executions(hlo_text: str, computations: Optional[Dict[str, List[str]]] = None) -> Dict[str, int]:
  """How many times each computation of a compiled module runs per call: loop bodies (scan over layers,
  over micro-batches) times their trip counts. XLA's own cost figures count a loop body once.
  `computations`: the module's, when already split (`_computations`)."""
  computations = computations or _computations(hlo_text)
  entry = next((line.split()[1].lstrip('%') for line in hlo_text.splitlines() if line.startswith('ENTRY')), None)
  runs = {entry: 1}
  order = [entry]
  for name in order:  # Callers before callees: XLA prints callees first, so walk from the entry.
    for line in computations.get(name, []):
      condition = re.search(r'condition=%([\w.\-]+)', line)
      trips = _trip_count(condition.group(1), computations) if condition and ' while(' in line else 1
      for key, group in _CALLEE_KEYS.findall(line):
        for callee in re.findall(r'%([\w.\-]+)', group):
          times = runs[name] * (trips if key == 'body' else 1)
          if callee not in runs:
            order.append(callee)
          runs[callee] = max(runs.get(callee, 0), times)
  return runs


def collectives(hlo_text: str) -> Dict[str, Dict[str, float]]:
  """Per collective kind: how many run per step and the bytes their results hold, per device. TPU's fused
  reduce-scatter (an all-reduce inside an `all-reduce-scatter` fusion) counts as a reduce-scatter of the
  all-reduced size."""
  computations = _computations(hlo_text)
  runs = executions(hlo_text, computations)
  found = {kind: {'count': 0, 'bytes': 0} for kind in COLLECTIVES}
  for name, lines in computations.items():
    for line in lines:
      match = _COLLECTIVE.search(line)
      if not match:
        continue
      kind = 'reduce-scatter' if name.startswith('all-reduce-scatter') else match.group(2)
      result = match.group(1)
      if '-start(' in line and kind == 'all-gather' and result.startswith('('):
        dtype, dims = _ARRAY.findall(re.sub(r'\{[^{}]*\}', '', result))[-1]  # (operand, result): the gathered.
        result = f'{dtype}[{dims}]'
      found[kind]['count'] += runs.get(name, 1)
      found[kind]['bytes'] += runs.get(name, 1) * array_bytes(result)
  return {kind: value for kind, value in found.items() if value['count']}


def collective_traffic(found: Dict[str, Dict[str, float]]) -> float:
  """Bytes each device sends (about what it receives) over the interconnect in a step: in a ring, an
  all-gather or reduce-scatter moves about the full array once, an all-reduce twice."""
  return sum(value['bytes'] * (2 if kind == 'all-reduce' else 1) for kind, value in found.items())


def roofline(chip, flops: float, hbm_bytes: float, interconnect_bytes: float) -> Dict:
  """The least time one device of `chip` needs for work of these sizes: each of its units (matrix units at
  the bf16 peak, HBM, the interconnect) at full speed and all overlapping; `bound` names the slowest."""
  seconds = {'compute': flops / (chip.per_device(chip.bf16_tflops) * 1e12),
             'hbm': hbm_bytes / (chip.per_device(chip.hbm_gbytes_per_s) * 1e9)}
  if chip.ici_gbytes_per_s:
    seconds['interconnect'] = interconnect_bytes / (chip.per_device(chip.ici_gbytes_per_s) * 1e9)
  return dict(seconds=seconds, step_seconds=max(seconds.values()), bound=max(seconds, key=seconds.get))


# --- One setting, compiled ------------------------------------------------------------------------------

@dataclasses.dataclass
class Compiled:
  settings: Settings
  memory: Dict[str, float]  # Bytes per device.
  needed: float
  hbm: float
  cost: Dict[str, float]  # Per device per step.
  collectives: Dict[str, Dict[str, float]]
  roofline: Dict[str, float]
  compile_seconds: float

  @property
  def fits(self) -> bool:
    return self.needed <= USABLE_HBM * self.hbm


def _cost_analysis(compiled) -> Dict[str, float]:
  from vit_jax import flops  # pylint: disable=import-outside-toplevel
  cost = flops.cost_analysis(compiled)
  return {'flops': float(cost.get('flops', 0.0)), 'bytes': float(cost.get('bytes accessed', 0.0))}


def _shard_bytes(tree) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


_SIZE = re.compile(r'(\d+(?:\.\d+)?)([KMGT])\b')


def compiler_out_of_memory(error: Exception) -> Optional[float]:
  """The bytes of temporaries a TPU compile refused for want of HBM (`RESOURCE_EXHAUSTED: Ran out of memory
  ... required for HLO temporaries (18.25G) exceeds available HBM (15.75G)`); None for other errors."""
  message = str(error)
  if 'RESOURCE_EXHAUSTED' not in message or 'memory' not in message.lower():
    return None
  sizes = _SIZE.findall(message.split('required', 1)[-1]) or _SIZE.findall(message)
  if not sizes:
    return None
  value, unit = sizes[0]
  return float(value) * 1024**'KMGT'.index(unit) * 1024


def compile_setting(config, settings: Settings, devices, tpu_slice, num_classes: int, channels: int,
                    num_steps: int) -> Compiled:
  """Compiles the train and eval steps of `config` with `settings` for the slice's devices; the memory they
  need per device, what a step costs, and its roofline."""
  from vit_jax import flops, sharding, train  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  config = with_settings(config, settings)
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  run = train.setup(config, mesh, num_classes=num_classes, num_steps=num_steps, channels=channels)
  eval_batch = config.eval_batch_size or config.batch_size
  batch_sharding = sharding.batch_sharding(mesh)
  eval_inputs = {'image': jax.ShapeDtypeStruct((eval_batch, *run.image_shape), jnp.float32,
                                               sharding=batch_sharding),
                 'label': jax.ShapeDtypeStruct((eval_batch,), jnp.int32, sharding=batch_sharding),
                 'mask': jax.ShapeDtypeStruct((eval_batch,), jnp.float32, sharding=batch_sharding)}
  state = _shard_bytes(run.abstract_state)
  batch = _shard_bytes(run.abstract_batch)
  hbm = tpu_slice.chip.per_device(tpu_slice.chip.hbm_gib) * GIB
  started = time.perf_counter()
  try:
    train_step = run.train_fn.lower(run.abstract_state, run.abstract_batch).compile()
    eval_step = run.eval_fn.lower(run.abstract_state.params, eval_inputs).compile()
  except jax.errors.JaxRuntimeError as e:
    temporaries = compiler_out_of_memory(e)
    if temporaries is None:
      raise
    # The TPU compiler refuses a program whose temporaries exceed the HBM: its figure is what it needs.
    memory = dict(state=state, batch=batch, train_temporaries=temporaries, eval_temporaries=0, code=0)
    return Compiled(settings=settings, memory=memory, needed=state + batch + temporaries, hbm=hbm, cost={},
                    collectives={}, roofline={}, compile_seconds=time.perf_counter() - started)
  seconds = time.perf_counter() - started

  train_memory, eval_memory = train_step.memory_analysis(), eval_step.memory_analysis()
  code = train_memory.generated_code_size_in_bytes + eval_memory.generated_code_size_in_bytes
  # Training holds the state, the batch, the step's temporaries and whatever output does not reuse a donated
  # input; evaluation holds the state (the optimizer's too: it lives on) beside its own batch and temporaries.
  train_peak = (train_memory.argument_size_in_bytes + train_memory.temp_size_in_bytes +
                train_memory.output_size_in_bytes - train_memory.alias_size_in_bytes)
  eval_peak = state + eval_memory.temp_size_in_bytes + _shard_bytes(eval_inputs) + eval_memory.output_size_in_bytes
  memory = dict(state=state, batch=batch, train_temporaries=train_memory.temp_size_in_bytes,
                eval_temporaries=eval_memory.temp_size_in_bytes, code=code)

  chip = tpu_slice.chip
  devices_count = len(devices)
  model_flops = flops.train_flops_per_image(config, num_classes, channels) * config.batch_size / devices_count
  executed = model_flops * (LEVER_COST['remat'] if settings.remat else 1.0)
  compiled_cost = _cost_analysis(train_step)
  # XLA's count of the operand and result bytes of the compiled step's operations. It counts a loop body (a
  # scanned layer, a micro-batch) once, so with loops it is a lower bound, and the roofline stays a bound.
  hbm_bytes = compiled_cost['bytes']
  found = collectives(train_step.as_text())
  traffic = collective_traffic(found)
  bound = roofline(chip, executed, hbm_bytes, traffic)
  peak = chip.per_device(chip.bf16_tflops) * 1e12
  bound.update(images_per_s_per_chip=config.batch_size / bound['step_seconds'] / tpu_slice.chips,
               mfu_ceiling=model_flops / peak / bound['step_seconds'])
  return Compiled(settings=settings, memory=memory, needed=code + max(train_peak, eval_peak), hbm=hbm,
                  cost=dict(model_flops=model_flops, executed_flops=executed, hbm_bytes=hbm_bytes,
                            compiled_flops=compiled_cost['flops'], collective_traffic=traffic),
                  collectives=found, roofline=bound, compile_seconds=seconds)


# --- The levers ------------------------------------------------------------------------------------------

def candidate_settings(config, num_devices: int) -> List[Settings]:
  """Every setting of the levers the batch and devices allow, beyond the configured one, cheapest first."""
  base = settings_of(config)
  fsdps = [f for f in (2**i for i in range(int(math.log2(num_devices)) + 1))
           if f >= base.fsdp and num_devices % f == 0]
  found = []
  for remat in sorted({base.remat, True}):
    for accum in (base.accum_steps * 2**i for i in range(5)):
      if (config.batch_size % accum or (config.batch_size // accum) % num_devices):
        continue  # The micro-batch must still split over every device.
      for fsdp in fsdps:
        # Remat comes with scan: unrolled, XLA schedules the recomputation early and keeps it (BENCHMARKS.md);
        # scan without remat keeps every layer's activations stacked, with no room to rematerialise.
        settings = Settings(fsdp=fsdp, scan=base.scan or remat, remat=remat, accum_steps=accum)
        if settings != base:
          found.append(settings)
  return sorted(found, key=lambda s: s.cost(base))


# --- The command -----------------------------------------------------------------------------------------

def dataset_shape(config, num_classes: Optional[int]) -> Tuple[int, int]:
  """(classes, channels) of config.dataset, from its tfds metadata (no data read)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from vit_jax import errors  # pylint: disable=import-outside-toplevel
  try:
    info = tfds.builder(config.dataset, data_dir=config.data_dir, try_gcs=False).info
  except Exception:  # pylint: disable=broad-except  (outside tfds' catalog; named below)
    info = None
  if info is None:
    if num_classes is None:
      raise errors.ConfigError(f'The dataset {config.dataset!r} is not in the tfds catalog, so its classes are '
                               'unknown here: give --num_classes (e.g. 21843 for ImageNet-21k).')
    return num_classes, 3
  channels = info.features['image'].shape[-1] or 3
  return num_classes or info.features['label'].num_classes, channels


def _gib(value: float) -> str:
  return f'{value / GIB:.2f} GiB'


def describe(result: Compiled) -> List[str]:
  s, m, r, c = result.settings, result.memory, result.roofline, result.cost
  loops = s.scan or s.accum_steps > 1
  verdict = 'fits' if result.fits else 'DOES NOT FIT'
  if not r:
    return [f'  settings: fsdp {s.fsdp}, scan {s.scan}, remat {s.remat}, accum_steps {s.accum_steps}: the TPU '
            f'compiler refused it for want of memory: it needs about {_gib(result.needed)} per device of '
            f'{_gib(result.hbm)} HBM (state {_gib(m["state"])}, temporaries {_gib(m["train_temporaries"])}): '
            f'{verdict}']
  lines = [f'  settings: fsdp {s.fsdp}, scan {s.scan}, remat {s.remat}, accum_steps {s.accum_steps} '
           f'(compiled train + eval steps in {result.compile_seconds:.0f} s)',
           f'  memory per device: {_gib(result.needed)} of {_gib(result.hbm)} HBM: {verdict} (state '
           f'{_gib(m["state"])}, train temporaries {_gib(m["train_temporaries"])}, eval temporaries '
           f'{_gib(m["eval_temporaries"])}, batch {_gib(m["batch"])}, code {_gib(m["code"])})',
           f'  per device per step: {c["model_flops"] / 1e12:.3g} TFLOP model ({c["executed_flops"] / 1e12:.3g} '
           f'executed), {c["hbm_bytes"] / 1e9:.3g} GB HBM traffic{" (loop bodies once)" if loops else ""}, '
           f'{c["collective_traffic"] / 1e9:.3g} GB over the interconnect']
  if result.collectives:
    lines.append('  collectives per step: ' + ', '.join(
        f'{v["count"]} {kind} ({v["bytes"] / 1e9:.3g} GB)' for kind, v in result.collectives.items()))
  times = ', '.join(f'{k} {v * 1e3:.1f} ms' for k, v in r['seconds'].items())
  lines.append(f'  roofline: {times} -> at best {r["step_seconds"] * 1e3:.1f} ms a step ({r["bound"]}-bound): '
               f'{r["images_per_s_per_chip"]:,.0f} images/s per chip, MFU ceiling {r["mfu_ceiling"]:.0%}')
  return lines


def plan(config, topology: str, num_classes: Optional[int] = None, search: bool = True,
         say=print) -> Tuple[Dict, Optional[str]]:
  """Compiles `config` for `topology`: the plan, and None when it fits, else a line saying what does."""
  from vit_jax import tpu  # pylint: disable=import-outside-toplevel
  tpu_slice = tpu.parse(topology)
  devices = tpu.compile_only_devices(tpu_slice)
  hosts = len({device.process_index for device in devices})
  classes, channels = dataset_shape(config, num_classes)
  num_steps = max(config.get('total_steps') or 0, config.warmup_steps + 1, 1000)  # Only the schedule uses it.
  say(f'Plan: {config.model.name}, batch {config.batch_size}, image {config.image_size}, {config.dtype}, '
      f'{classes} classes')
  say(f'  on {tpu_slice.describe()}, {hosts} host{"s" if hosts > 1 else ""}; per device '
      f'{_gib(tpu_slice.chip.per_device(tpu_slice.chip.hbm_gib) * GIB)} HBM, '
      f'{tpu_slice.chip.per_device(tpu_slice.chip.bf16_tflops):g} bf16 TFLOP/s')
  base = settings_of(config)
  first = compile_setting(config, base, devices, tpu_slice, classes, channels, num_steps)
  for line in describe(first):
    say(line)
  report = dict(topology=tpu_slice.accelerator_type, torus=tpu_slice.topology_name, hosts=hosts,
                devices=len(devices), model=config.model.name, batch_size=config.batch_size,
                dtype=config.dtype, configured=_as_dict(first), tried=[], fits=first.fits)
  if first.fits:
    return report, None
  needs = (f'{config.model.name} at batch {config.batch_size} needs {_gib(first.needed)} per device on '
           f'{tpu_slice.accelerator_type} (HBM {_gib(first.hbm)}): it does not fit as configured.')
  if not search:
    return report, f'{needs} Run the plan without --nosearch for a setting that does.'
  say('Does not fit as configured; trying the levers, cheapest first:')
  state_by_layout = {}  # The state's bytes per device depend on fsdp and scan (stacked layers) only.
  smallest = first
  for settings in candidate_settings(config, len(devices)):
    layout = (settings.fsdp, settings.scan)
    if layout not in state_by_layout:
      state_by_layout[layout] = _state_bytes(config, settings, devices, classes, channels, num_steps)
    if state_by_layout[layout] > USABLE_HBM * first.hbm:
      continue  # The train state alone does not fit: no need to compile. (The rest is not predicted: how
      # temporaries shrink with fsdp and micro-batches is the compiler's to say, e.g. 15x from fsdp 1 to 4.)
    result = compile_setting(config, settings, devices, tpu_slice, classes, channels, num_steps)
    report['tried'].append(_as_dict(result))
    say(f'  {settings.flags()}: {_gib(result.needed)}: {"fits" if result.fits else "does not fit"}')
    smallest = min(smallest, result, key=lambda r: r.needed)
    if result.fits:
      for line in describe(result):
        say(line)
      report['suggested'] = _as_dict(result)
      return report, (f'{needs} It fits with {settings.flags()} ({_gib(result.needed)}, at best '
                      f'{result.roofline["images_per_s_per_chip"]:,.0f} images/s per chip).')
  return report, (f'{config.model.name} at batch {config.batch_size} does not fit on {tpu_slice.accelerator_type} '
                  f'even with every lever: the smallest, {smallest.settings.flags()}, needs '
                  f'{_gib(smallest.needed)} per device of {_gib(first.hbm)}. Use a larger slice or a smaller '
                  '--config.batch_size.')


def _state_bytes(config, settings, devices, classes, channels, num_steps) -> float:
  """The train state's bytes per device under `settings` (from shapes; nothing compiled)."""
  from vit_jax import sharding, train  # pylint: disable=import-outside-toplevel
  config = with_settings(config, settings)
  run = train.setup(config, sharding.make_mesh(config.mesh, devices=devices), num_classes=classes,
                    num_steps=num_steps, channels=channels)
  return _shard_bytes(run.abstract_state)


def _as_dict(result: Compiled) -> Dict:
  return dict(settings=dataclasses.asdict(result.settings), needed_bytes=result.needed, hbm_bytes=result.hbm,
              fits=result.fits, memory=result.memory, cost=result.cost, collectives=result.collectives,
              roofline=result.roofline, compile_seconds=result.compile_seconds)


def markdown_table(reports: List[Dict]) -> str:
  """The plans (`--json` files) as BENCHMARKS.md's table: per model and slice, the setting that fits (as
  configured, or the one the levers found), its memory per device and its roofline."""
  lines = ['| model | slice | batch | fits with | GiB per device (of HBM) | roofline images/s per chip | '
           'MFU ceiling | bound by | compile s |', '|---|---|---|---|---|---|---|---|---|']
  for report in reports:
    chosen = report['configured'] if report['configured']['fits'] else report.get('suggested')
    if chosen is None:
      smallest = min([report['configured'], *report['tried']], key=lambda r: r['needed_bytes'])
      lines.append(f'| {report["model"]} | {report["topology"]} | {report["batch_size"]} | nothing tried fits '
                   f'(smallest {Settings(**smallest["settings"]).flags()}) | '
                   f'{smallest["needed_bytes"] / GIB:.1f} ({smallest["hbm_bytes"] / GIB:.0f}) | | | | |')
      continue
    settings, roofline = Settings(**chosen['settings']), chosen['roofline']
    found = '' if chosen is report['configured'] else ' (found)'
    lines.append(
        f'| {report["model"]} | {report["topology"]} | {report["batch_size"]} | fsdp {settings.fsdp}, remat '
        f'{settings.remat}, scan {settings.scan}, accum {settings.accum_steps}{found} | '
        f'{chosen["needed_bytes"] / GIB:.1f} ({chosen["hbm_bytes"] / GIB:.0f}) | '
        f'{roofline["images_per_s_per_chip"]:,.0f} | {roofline["mfu_ceiling"]:.0%} | {roofline["bound"]} | '
        f'{sum(r["compile_seconds"] for r in [report["configured"], *report["tried"]]):.0f} |')
  return '\n'.join(lines)


def define_flags() -> None:
  """The command line; defined only when run as a program (as `vit_jax.fewshot` does), so that importing this
  module next to `vit_jax.main` or `vit_jax.benchmark` (which have --config and --json too) does not clash."""
  config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/vit_imagenet.py:L/16.',
                                  lock_config=True)
  flags.DEFINE_string('topology', None, 'The slice: v4-32, v5litepod-16, v5p-128, v6e-64, v3-32, or a torus '
                      'such as v4:2x2x4.')
  flags.DEFINE_integer('num_classes', None, 'Classes of the dataset; default: from the tfds catalog (needed for '
                       'datasets outside it, e.g. imagenet21k: 21843).')
  flags.DEFINE_bool('search', True, 'When it does not fit, compile the levers\' settings until one fits.')
  flags.DEFINE_string('json', None, 'Also write the plan (and every setting tried) to this JSON file.')
  flags.mark_flags_as_required(['config', 'topology'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import jax  # pylint: disable=import-outside-toplevel
  from vit_jax import errors  # pylint: disable=import-outside-toplevel
  # Compile only: never start (or wait for) a TPU this host may have, e.g. one a running job holds.
  jax.config.update('jax_platforms', 'cpu')
  errors.quiet_library_logs()
  args = flags.FLAGS
  report, problem = plan(args.config, args.topology, num_classes=args.num_classes, search=args.search)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(report, f, indent=1)
  if problem:
    raise errors.ConfigError(problem)
  print(f'Fits: {args.config.model.name} at batch {args.config.batch_size} on {report["topology"]}.', flush=True)


if __name__ == '__main__':
  from vit_jax import errors as _errors  # pylint: disable=ungrouped-imports
  define_flags()
  _errors.run(main)
