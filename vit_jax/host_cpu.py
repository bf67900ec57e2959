"""The host process set up for JAX's CPU backend, before JAX starts its backends.

Every entry point (`vit_jax.main`, `vit_jax.ablate`, the benchmark's workers, the notebooks) calls `setup`
first, so that a run gets the same host wherever it starts:
- the CPU split into `config.cpu_devices` JAX devices (a device count in XLA_FLAGS wins);
- with one CPU device, each step run on the calling thread (no async dispatch);
- glibc's allocator told to keep freed step buffers mapped (Linux with glibc, CPU backend only).

The measurements behind these choices are in BENCHMARKS.md ("Host setup on CPU").
"""
import ctypes
import functools
import importlib.util
import os
import pkgutil
import re
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp

from vit_jax import errors

# glibc mallopt parameters (malloc.h); their values are C ints.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_INT_MAX = 2**31 - 1

def forced_device_count() -> Optional[int]:
  """The CPU device count given in XLA_FLAGS (--xla_force_host_platform_device_count), if any."""
  match = re.search(r'xla_force_host_platform_device_count=(\d+)', os.environ.get('XLA_FLAGS', ''))
  return int(match.group(1)) if match else None


def _backends_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return xla_bridge.backends_are_initialized()


def runs_on_cpu() -> bool:
  """Whether JAX's default backend is (or, before it starts, will be) the CPU: answered without starting it,
  from JAX_PLATFORMS and the accelerator plugins installed."""
  if _backends_started():
    return jax.default_backend() == 'cpu'
  platforms = jax.config.jax_platforms or os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  # PJRT plugins (CUDA, ROCm, ...) live in the `jax_plugins` namespace package; TPUs come with libtpu, which
  # also serves CPU hosts (compiling for a TPU topology): a TPU host is one whose PCI bus has TPU chips.
  if importlib.util.find_spec('libtpu') is not None and _tpu_chips() > 0:
    return False
  plugins = importlib.util.find_spec('jax_plugins')
  return plugins is None or not any(pkgutil.iter_modules(plugins.submodule_search_locations or []))


def _tpu_chips() -> int:
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top  (JAX's own PCI scan; no public API)
  return hardware_utils.num_available_tpu_chips_and_device_id()[0]


def keep_freed_buffers_mapped() -> bool:
  """Every malloc'ed block from the heap, and up to 2 GiB of freed memory kept at its top.

  XLA:CPU mallocs a step's temporaries as one block. glibc serves blocks above 32 MiB with a fresh mmap and
  unmaps them on free, so each step would fault all their pages in again; with these settings the next step
  reuses the same pages (peak RSS unchanged). Returns whether glibc took the settings.
  """
  try:
    libc = ctypes.CDLL('libc.so.6')
  except OSError:
    return False  # Not glibc (macOS, musl): nothing to tune.
  return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) and
              libc.mallopt(_M_TOP_PAD, _INT_MAX))


# Each dot handed to oneDNN alone. Not fused with its neighbours (LIBRARY_FUSION_TYPE_DOT): jaxlib 0.10.2
# aborts on a oneDNN fusion of a dot, a bias add and a square, which every GELU backward pass holds
# (tests/onednn_abort_repro.py).
ONEDNN_DOT = {'xla_cpu_use_onednn': True,
              'xla_cpu_experimental_onednn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}


@functools.lru_cache(maxsize=None)
def _onednn_dot_available() -> bool:
  """Whether this jaxlib takes the oneDNN options (other versions may name them differently)."""
  try:
    jax.jit(jnp.matmul, compiler_options=ONEDNN_DOT).lower(jnp.ones((2, 2)), jnp.ones((2, 2))).compile()
  except jax.errors.JaxRuntimeError as e:
    logging.warning('This jaxlib does not take the oneDNN dot options (%s): XLA:CPU\'s default dot runs.', e)
    return False
  return True


def compiler_options(cpu_matmul: str = 'onednn', platform: Optional[str] = None) -> Optional[dict]:
  """XLA compiler options for a jitted step: oneDNN dots when `cpu_matmul` is 'onednn' (`config.cpu_matmul`)
  and the step runs on the CPU (`platform`, default the default backend's); None (XLA's defaults) otherwise.
  Accelerators are left alone, also when compiled for from a CPU host (`plan.py`)."""
  if cpu_matmul not in ('onednn', 'xla'):
    raise errors.ConfigError(f'Unknown cpu_matmul {cpu_matmul!r}: choose onednn or xla (--config.cpu_matmul=...).')
  if cpu_matmul == 'xla' or (platform or jax.default_backend()) != 'cpu' or not _onednn_dot_available():
    return None
  return dict(ONEDNN_DOT)


def light_compile_options(platform: Optional[str] = None) -> Optional[dict]:
  """XLA compiler options for a program that runs rarely (the weights' initialisation, a checkpoint's
  checksums): on the CPU, backend optimisation level 1, which compiles these faster than the default level
  and runs them as fast, with the same results (tests/test_train.py, tests/test_checkpoints.py); level 0
  would run them slower and move a few initial weights by an ulp (BENCHMARKS.md, "Start-up"). None elsewhere
  (`platform`, default the default backend's)."""
  if (platform or jax.default_backend()) != 'cpu':
    return None
  return {'xla_backend_optimization_level': 1}


def setup(config=None, cpu_devices: Optional[int] = None) -> dict:
  """Sets up the host from `config.cpu_devices` (or `cpu_devices`); call before any JAX computation.

  Returns what was set: the CPU device count, whether async dispatch is on, and whether the allocator was
  tuned. Accelerator runs are left alone: their devices are the accelerators.
  """
  if config is not None:
    cpu_devices = config.get('cpu_devices')
  if cpu_devices is not None and cpu_devices < 1:
    raise errors.ConfigError(f'config.cpu_devices={cpu_devices}: give a positive device count, or None for one.')
  on_cpu = runs_on_cpu()
  forced = forced_device_count()
  if _backends_started():
    # Too late to change the device count or the dispatch mode: report what this process has.
    logging.warning('host_cpu.setup called after JAX started its backends: the CPU device count and dispatch '
                    'mode stay as they are.')
  else:
    if cpu_devices is not None and forced is None:
      jax.config.update('jax_num_cpu_devices', cpu_devices)
    if on_cpu and importlib.util.find_spec('libtpu') is not None:
      # libtpu installed on a host without TPU chips (to compile for a TPU topology, `plan.py`) would probe for
      # chips and print errors at start-up: the CPU is chosen outright.
      jax.config.update('jax_platforms', 'cpu')
    if on_cpu and (forced or cpu_devices or 1) == 1:
      # A helper thread's glibc arena (mmapped heaps of at most 64 MiB) cannot keep a step's block; the main
      # thread's heap can. Several devices run their partitions on a thread pool anyway, so they keep async.
      jax.config.update('jax_cpu_enable_async_dispatch', False)
  applied = {
      'cpu': on_cpu,
      'cpu_devices': forced or max(jax.config.jax_num_cpu_devices, 1),
      'async_dispatch': bool(jax.config.read('jax_cpu_enable_async_dispatch')),
      'allocator_tuned': on_cpu and keep_freed_buffers_mapped(),
  }
  if on_cpu:
    logging.info('Host setup: %d CPU device(s), async dispatch %s, freed buffers kept mapped: %s.',
                 applied['cpu_devices'], 'on' if applied['async_dispatch'] else 'off',
                 applied['allocator_tuned'])
  return applied
