"""What a step costs and what the device could do: model FLOPs per image and the peak that MFU is taken of.

Model FLOPs (the MFU convention): XLA's cost analysis of the forward pass of the unscanned model, multiply
and add counted as two; a training step is three forwards' worth (the backward pass costs two). Recomputation
(`remat`) is work the device does but not model FLOPs, so it lowers MFU, as it should.

Peaks: dense bf16 per JAX device (a TPU v4+ chip, a v2/v3 core, a GPU), from the vendors' spec sheets; on
CPU, a large fp32 matmul under jit measured on this host, shared by its local devices.
"""
import statistics
import time
from typing import Optional

import jax
import jax.numpy as jnp

from vit_jax import models

# (substring of `device.device_kind`, dense bf16 TFLOP/s per device). Longest match wins ('H100 PCIe' before
# 'H100'); v2/v3 list two devices (cores) per chip.
PEAK_TFLOPS = (
    ('TPU v2', 22.5), ('TPU v3', 61.5), ('TPU v4', 275.0), ('TPU v5 lite', 197.0), ('TPU v5e', 197.0),
    ('TPU v5p', 459.0), ('TPU v5', 459.0), ('TPU v6 lite', 918.0), ('TPU v6e', 918.0), ('TPU7x', 2307.0),
    ('V100', 125.0), ('A100', 312.0), ('L4', 121.0), ('H100 PCIe', 756.0), ('H100', 989.0), ('H200', 989.0),
    ('B200', 2250.0),
)


def forward_flops_per_image(config, num_classes: int, channels: int) -> float:
  """FLOPs of one image's forward pass through the model `config` describes (traced from shapes only: nothing
  is allocated or compiled)."""
  unrolled = config.copy_and_resolve_references()
  unrolled.model.scan, unrolled.model.remat = False, False  # The cost analysis counts a loop body once.
  model = models.from_config(unrolled, num_classes)
  image = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, channels), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), image)
  return float(cost_analysis(jax.jit(model.apply).lower(variables, image))['flops'])


def cost_analysis(stage) -> dict:
  """XLA's cost figures ('flops', 'bytes accessed', ...) of a lowered or compiled function (some versions
  return them in a one-element list)."""
  cost = stage.cost_analysis()
  return cost[0] if isinstance(cost, (list, tuple)) else cost


def train_flops_per_image(config, num_classes: int, channels: int) -> float:
  return 3 * forward_flops_per_image(config, num_classes, channels)


def matmul_peak(size: int = 3072, repeats: int = 5, warmup: int = 2) -> dict:
  """FLOP/s of a large fp32 matmul under jit on the default device: the practical peak of a CPU."""
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  for _ in range(warmup):
    matmul(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  return dict(kind='matmul', backend=jax.default_backend(), size=size, seconds=seconds,
              flops_per_s=2 * size**3 / seconds, devices=jax.device_count(),
              device_kind=jax.devices()[0].device_kind)


def peak_flops_per_device(device=None) -> Optional[float]:
  """The peak one device of this kind can do (see the module docstring); None for an unknown accelerator."""
  device = device or jax.local_devices()[0]
  if device.platform == 'cpu':
    # All local CPU devices share the host's cores; one jitted matmul uses them all.
    # 1024^3 reaches the larger sizes' rate within the noise, in a fraction of a second at startup.
    return matmul_peak(size=1024, repeats=5, warmup=1)['flops_per_s'] / jax.local_device_count()
  matches = [(name, tflops) for name, tflops in PEAK_TFLOPS if name in device.device_kind]
  return max(matches, key=lambda m: len(m[0]))[1] * 1e12 if matches else None
