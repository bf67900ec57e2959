"""How arrays are laid out over the devices: the (data, fsdp) mesh, batch and parameter shardings, and global
batches fed to it.

The batch is split over every device; parameters and optimizer state of at least `min_shard_size` elements
are split along the fsdp axis, the rest is replicated. The same functions serve one CPU device, simulated
devices and a pod.
"""
import collections
from typing import Any, Dict, Iterator, Tuple

import jax
from jax.experimental import mesh_utils
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vit_jax import errors

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = MESH_AXES  # The batch is split over every device; fsdp devices share parameters, not data.


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A 2-D (data, fsdp) mesh over every device of every process; -1 takes the devices left over.

  The fsdp axis is innermost, so parameter shards are gathered between neighbouring devices (within a host
  where the fsdp size allows it); the data axis spans hosts, and slices (`device_grid`).
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  sizes = {name: int(mesh_config.get(name, 1)) for name in MESH_AXES}
  unknown = set(mesh_config.keys()) - set(MESH_AXES) - {'min_shard_size'}
  if unknown:
    raise errors.ConfigError(f'Unknown mesh axes {sorted(unknown)} in config.mesh; the axes are {MESH_AXES}.')
  free = [name for name, size in sizes.items() if size == -1]
  fixed = int(np.prod([size for size in sizes.values() if size != -1]))
  if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
    raise errors.ConfigError(f'Invalid mesh {sizes}: give each axis a positive size, and -1 to at most one.')
  if free:
    if fixed == 0 or devices.size % fixed:
      raise errors.ConfigError(f'The mesh {sizes} does not divide the {devices.size} devices: the fixed axes multiply '
                               f'to {fixed}. Set --config.mesh.* so that their product divides {devices.size}.')
    sizes[free[0]] = devices.size // fixed
  if int(np.prod(list(sizes.values()))) != devices.size:
    raise errors.ConfigError(f'The mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices but there are '
                             f'{devices.size}: set --config.mesh.data=-1 to use every device, or sizes that multiply '
                             f'to {devices.size}.')
  return Mesh(device_grid([sizes[name] for name in MESH_AXES], list(devices.flat)), MESH_AXES)


def device_grid(shape, devices) -> np.ndarray:
  """`devices` arranged in a (data, fsdp) grid that follows the interconnect: on TPU, `mesh_utils` maps the
  axes onto the physical torus, so an fsdp group is a ring of neighbouring chips; over several slices
  (multi-slice, joined by the slower data-centre network) the data axis runs across slices and everything else
  stays within one, so that only the gradient all-reduce crosses the network. CPUs and GPUs keep their order.
  """
  slices = sorted({getattr(device, 'slice_index', 0) for device in devices})
  if len(slices) > 1:
    if shape[0] % len(slices):
      raise errors.ConfigError(
          f'The devices span {len(slices)} slices, but the data axis ({shape[0]}) is not a multiple of that: '
          f'only the data axis may cross slices. Set --config.mesh.fsdp so that the data axis is.')
    return mesh_utils.create_hybrid_device_mesh((shape[0] // len(slices), *shape[1:]), (len(slices), 1), devices,
                                                allow_split_physical_axes=True)
  return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)


def num_batch_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[name] for name in BATCH_AXES]))


def check_batch_size(batch_size: int, mesh: Mesh, accum_steps: int = 1, field: str = 'batch_size') -> None:
  """Fails before any compile when the batch (`config.<field>`) cannot be split over the devices (and
  micro-batches)."""
  shards = num_batch_shards(mesh)
  layout = ' x '.join(f'{name}={mesh.shape[name]}' for name in BATCH_AXES)
  if batch_size % shards:
    raise errors.ConfigError(
        f'The batch size {batch_size} is not divisible by the number of devices it is split over '
        f'({shards}: {layout}): set --config.{field} to a multiple of {shards} (e.g. '
        f'{max(1, batch_size // shards) * shards}).')
  if accum_steps < 1 or batch_size % accum_steps:
    raise errors.ConfigError(f'config.accum_steps={accum_steps} does not divide the batch size {batch_size}: use a '
                             f'divisor of it, e.g. {max(d for d in range(1, 9) if batch_size % d == 0)}.')
  if (batch_size // accum_steps) % shards:
    raise errors.ConfigError(
        f'The micro-batch {batch_size // accum_steps} (batch {batch_size} / accum_steps {accum_steps}) is not '
        f'divisible by the {shards} devices ({layout}): use a batch size that is a multiple of '
        f'{shards * accum_steps}, or fewer accumulation steps.')


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_sharding(shape: Tuple[int, ...], mesh: Mesh, min_size: int) -> NamedSharding:
  """Splits an array of at least `min_size` elements along its largest dimension that the fsdp axis
  divides; smaller arrays (biases, norms, scalars) and arrays with no such dimension stay replicated."""
  fsdp = mesh.shape['fsdp']
  if fsdp == 1 or int(np.prod(shape)) < min_size:
    return replicated(mesh)
  candidates = [(size, axis) for axis, size in enumerate(shape) if size % fsdp == 0]
  if not candidates:
    return replicated(mesh)
  _, axis = max(candidates)
  spec = [None] * len(shape)
  spec[axis] = 'fsdp'
  return NamedSharding(mesh, P(*spec))


def state_shardings(abstract_state: Any, mesh: Mesh, min_size: int) -> Any:
  """Shardings of any pytree of arrays (parameters and optimizer state alike: Adam's moments have the
  parameters' shapes), with the pytree's structure."""
  return jax.tree.map(lambda x: fsdp_sharding(x.shape, mesh, min_size), abstract_state)


def to_global_batch(local_batch: Dict[str, np.ndarray], mesh: Mesh) -> Dict[str, jax.Array]:
  """Each process's slice of the batch -> one global `jax.Array` per field, split over the devices."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def prefetch_to_mesh(batches: Iterator[Dict[str, np.ndarray]], mesh: Mesh, size: int = 2):
  """Yields global batches already on their devices, `size` ahead: the copy of the next batch overlaps the
  running step (on accelerators steps are dispatched asynchronously), so the devices never wait for the host."""
  queue = collections.deque()
  for batch in batches:
    queue.append(to_global_batch(batch, mesh))
    if len(queue) >= size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
