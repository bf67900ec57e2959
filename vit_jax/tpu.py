"""TPU slices as users name them (`v4-32`, `v5litepod-16`, `v5p-128`, `v6e-64`), the chips' sheets, and their
devices for compiling on a host without TPUs (libtpu compiles for any topology; `plan.py` uses it).

Names: v2, v3, v4 and v5p count TensorCores (two per chip), v5e and v6e count chips. JAX sees one device per
TensorCore on v2/v3 and one per chip elsewhere (v4 and v5p run their two cores as one, "megacore").
"""
import dataclasses
import os
import re
from typing import Optional, Tuple

from vit_jax import errors


@dataclasses.dataclass(frozen=True)
class Chip:
  """One chip generation, from the vendor's sheet (cloud.google.com/tpu/docs/<generation>), per chip."""
  generation: str  # As libtpu's topology names spell it.
  device_kind: str  # What `jax.Device.device_kind` says.
  devices_per_chip: int
  hbm_gib: float
  hbm_gbytes_per_s: float
  bf16_tflops: float
  # Bytes a chip moves per second in an all-reduce: the pod's all-reduce bandwidth over its chips where the
  # sheet gives it (v3, v4, v5e, v6e; for v5e and v6e it is half their bidirectional ICI bandwidth), half the
  # bidirectional ICI bandwidth for v5p; v2's sheet gives neither.
  ici_gbytes_per_s: Optional[float]
  dims: int  # 2-D or 3-D torus.
  counts_cores: bool  # Whether `vN-<count>` counts TensorCores (else chips).
  aliases: Tuple[str, ...] = ()

  def per_device(self, value: float) -> float:
    return value / self.devices_per_chip


CHIPS = (
    Chip('v2', 'TPU v2', 2, 16, 600, 45, None, 2, True),
    Chip('v3', 'TPU v3', 2, 32, 900, 123, 332, 2, True),
    Chip('v4', 'TPU v4', 1, 32, 1200, 275, 269, 3, True),
    Chip('v5e', 'TPU v5 lite', 1, 16, 819, 197, 200, 2, False, aliases=('v5litepod',)),
    Chip('v5p', 'TPU v5', 1, 95, 2765, 459, 600, 3, True),
    Chip('v6e', 'TPU v6 lite', 1, 32, 1640, 918, 400, 2, False),
)
_BY_NAME = {name: chip for chip in CHIPS for name in (chip.generation, *chip.aliases)}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A slice: its chip, how many, and their torus (`bounds`, chips per dimension)."""
  name: str  # As the user typed it.
  chip: Chip
  chips: int
  bounds: Tuple[int, ...]

  @property
  def topology_name(self) -> str:
    return f'{self.chip.generation}:{"x".join(map(str, self.bounds))}'

  @property
  def num_devices(self) -> int:
    return self.chips * self.chip.devices_per_chip

  @property
  def accelerator_type(self) -> str:
    """The slice's name in `gcloud ... --accelerator-type`."""
    count = 2 * self.chips if self.chip.counts_cores else self.chips  # Two TensorCores a chip.
    prefix = 'v5litepod' if self.chip.generation == 'v5e' else self.chip.generation
    return f'{prefix}-{count}'

  def describe(self) -> str:
    per_chip = 'one device per TensorCore' if self.chip.devices_per_chip > 1 else 'one device per chip'
    return (f'{self.accelerator_type}: {self.chips} {self.chip.device_kind} chip{"s" if self.chips > 1 else ""} in a '
            f'{"x".join(map(str, self.bounds))} torus (libtpu topology {self.topology_name}), '
            f'{self.num_devices} JAX devices ({per_chip})')


def torus_bounds(chips: int, dims: int) -> Tuple[int, ...]:
  """The shape of a slice of `chips` chips, as Cloud TPU builds it: 2x2(x1) for four, then each doubling
  doubles the last of the smallest dimensions (v4-32: 2x2x4, v4-64: 2x4x4; v5e-32: 4x8)."""
  if chips == 1:
    return (1,) * dims
  bounds = [2, 2] + [1] * (dims - 2)
  while int(_product(bounds)) < chips:
    smallest = min(bounds)
    last = max(i for i, size in enumerate(bounds) if size == smallest)
    bounds[last] *= 2
  return tuple(bounds)


def _product(values) -> int:
  result = 1
  for value in values:
    result *= value
  return result


def parse(name: str) -> Slice:
  """`v4-32`, `v5litepod-16`, `v5e-16`, `v5p-128`, `v6e-64`, `v3-8`, or libtpu's own `v4:2x2x4`."""
  known = ', '.join(sorted(_BY_NAME))
  example = 'e.g. v4-32, v5litepod-16, v5p-128, v6e-64, or a torus as v4:2x2x4'
  match = re.fullmatch(r'(v\w+?)(?:-(\d+)|:(\d+(?:x\d+)+))', name.strip().lower())
  if not match or match.group(1) not in _BY_NAME:
    raise errors.ConfigError(f'Unknown TPU topology {name!r}: give an accelerator type of {known} with its size '
                             f'({example}).')
  chip = _BY_NAME[match.group(1)]
  if match.group(3):  # An explicit torus.
    bounds = tuple(int(size) for size in match.group(3).split('x'))
    if len(bounds) != chip.dims or min(bounds) < 1:
      raise errors.ConfigError(f'{name!r}: a {chip.generation} torus has {chip.dims} dimensions, e.g. '
                               f'{chip.generation}:{"x".join(map(str, torus_bounds(4, chip.dims)))}.')
    return Slice(name, chip, _product(bounds), bounds)
  count = int(match.group(2))
  chips, remainder = divmod(count, 2) if chip.counts_cores else (count, 0)  # Two TensorCores a chip.
  smallest = 1 if not chip.counts_cores else 4
  valid = [n for n in (1, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if n >= smallest]
  if remainder or chips not in valid:
    sizes = ', '.join(f'{chip.generation}-{n * (2 if chip.counts_cores else 1)}' for n in valid[:6])
    raise errors.ConfigError(f'{name!r} is not a {chip.generation} slice size this planner knows: the sizes are '
                             f'powers of two ({sizes}, ...), or give the torus as {chip.generation}:AxB'
                             f'{"xC" if chip.dims == 3 else ""}.')
  return Slice(name, chip, chips, torus_bounds(chips, chip.dims))


def compile_only_devices(tpu_slice: Slice):
  """The slice's devices, for compiling without TPUs (libtpu must be installed: the `tpu` extra)."""
  try:
    import libtpu  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise errors.ConfigError("Compiling for a TPU needs libtpu, which is not installed: pip install -e '.[tpu]' "
                             "(it installs the libtpu that the installed jax pins).") from None
  # libtpu otherwise asks the VM's metadata for these, warns, and prints a stack trace: there is no VM here.
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', tpu_slice.accelerator_type)
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  # libtpu lets one process at a time hold a host's chips (/tmp/libtpu_lockfile); compiling holds none, so
  # plans may run side by side, and beside a job on a TPU VM.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  options = {'chip_config_name': 'megacore'} if tpu_slice.chip.generation in ('v4', 'v5p') else {}
  if tpu_slice.chips < 4:  # Smaller than libtpu's default host of 2x2 chips: the slice is one host.
    options['chips_per_host_bounds'] = (*tpu_slice.bounds, 1, 1)[:3]
  return topologies.get_topology_desc(platform='tpu', topology_name=tpu_slice.topology_name, **options).devices
