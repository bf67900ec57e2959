"""The device mesh, batch shardings and global batches: layouts that cannot work fail before any compile."""
import jax
import ml_collections
import numpy as np
import pytest

from vit_jax import sharding


def test_layouts_that_cannot_work_fail_before_compiling():
  one_device = jax.devices()[:1]
  with pytest.raises(ValueError, match='needs 2 devices but there are 1'):
    sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=1)), one_device)
  with pytest.raises(ValueError, match='does not divide the 1 devices'):
    sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=2)), one_device)
  with pytest.raises(ValueError, match='Unknown mesh axes'):
    sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, model=1)), one_device)
  devices = np.array(jax.devices() * 4)  # Shapes only: the checks read mesh sizes, nothing runs.
  mesh = jax.sharding.Mesh(devices.reshape(2, 2), sharding.MESH_AXES)
  with pytest.raises(ValueError, match=r'batch size 6 is not divisible .* \(4: data=2 x fsdp=2\)'):
    sharding.check_batch_size(6, mesh)
  with pytest.raises(ValueError, match='accum_steps=3 does not divide the batch size 32'):
    sharding.check_batch_size(32, mesh, accum_steps=3)
  with pytest.raises(ValueError, match=r'micro-batch 2 \(batch 16 / accum_steps 8\) is not divisible'):
    sharding.check_batch_size(16, mesh, accum_steps=8)


def test_prefetch_to_mesh_keeps_order_and_yields_every_batch_on_the_devices():
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
  batches = [{'image': np.full((4, 2), i, np.float32), 'label': np.full((4,), i, np.int32)} for i in range(5)]
  out = list(sharding.prefetch_to_mesh(iter(batches), mesh, size=2))
  assert [int(b['label'][0]) for b in out] == [0, 1, 2, 3, 4]
  assert all(isinstance(b['image'], jax.Array) and b['image'].sharding == sharding.batch_sharding(mesh)
             for b in out)


class _FakeDevice:
  """What the layout reads of a device: its id, platform, kind and slice."""

  def __init__(self, id_, slice_index):
    self.id, self.slice_index, self.platform, self.device_kind, self.process_index = (
        id_, slice_index, 'cpu', 'fake', slice_index)

  def __repr__(self):
    return f'd{self.id}/s{self.slice_index}'


def test_over_several_slices_only_the_data_axis_crosses_them():
  # Two slices of four devices, listed interleaved (as a process order may give them).
  devices = [_FakeDevice(i, i % 2) for i in range(8)]
  grid = sharding.device_grid((4, 2), devices)
  slice_of = np.vectorize(lambda d: d.slice_index)(grid)
  assert slice_of.tolist() == [[0, 0], [0, 0], [1, 1], [1, 1]]  # fsdp groups (rows) stay within a slice.
  assert sorted(d.id for d in grid.flat) == list(range(8))
  with pytest.raises(ValueError, match='span 2 slices, but the data axis \\(1\\) is not a multiple'):
    sharding.device_grid((1, 8), devices)
  one_slice = sharding.device_grid((2, 2), jax.devices()[:1] * 4)  # CPUs keep their order.
  assert one_slice.shape == (2, 2)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
  assert list(mesh.devices.flat) == jax.devices()
