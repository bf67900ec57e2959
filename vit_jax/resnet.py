"""BiT-style ResNet parts: weight-standardised convolutions and GroupNorm.

Used as the stem of the hybrid ViT (paper Sec. 3.1, "R50+ViT-B/16"). Module names follow the published
hybrid checkpoints: `conv_root`, `gn_root`, `block{n}/unit{m}/{conv1,conv2,conv3,conv_proj}`, `gn*`.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


# Of the weight standardisation, as in the published BiT and hybrid ViT code: (w - mean) / (std + eps).
STD_CONV_EPS = 1e-5


def standardize(kernel: jax.Array, eps: float = STD_CONV_EPS) -> jax.Array:
  """A conv kernel (H, W, in, out) with zero mean and (almost) unit standard deviation per output channel."""
  kernel = kernel - jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
  return kernel / (jnp.std(kernel, axis=(0, 1, 2), keepdims=True) + eps)


class StdConv(nn.Conv):
  """Conv whose kernel is standardised (`standardize`) before use."""

  def param(self, name, init_fn, *init_args, **init_kwargs):
    kernel = super().param(name, init_fn, *init_args, **init_kwargs)
    return standardize(kernel) if name == 'kernel' else kernel


class BottleneckUnit(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 bottleneck with GroupNorm, projection shortcut when the shape changes."""
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    out_features = self.features * 4
    residual = x
    if x.shape[-1] != out_features or self.strides != 1:
      residual = StdConv(out_features, (1, 1), self.strides, use_bias=False, name='conv_proj')(x)
      residual = nn.GroupNorm(name='gn_proj')(residual)

    y = StdConv(self.features, (1, 1), use_bias=False, name='conv1')(x)
    y = nn.relu(nn.GroupNorm(name='gn1')(y))
    y = StdConv(self.features, (3, 3), self.strides, use_bias=False, name='conv2')(y)
    y = nn.relu(nn.GroupNorm(name='gn2')(y))
    y = StdConv(out_features, (1, 1), use_bias=False, name='conv3')(y)
    # Zero-initialised last norm: each unit starts as the identity, which keeps deep stacks trainable.
    y = nn.GroupNorm(scale_init=nn.initializers.zeros, name='gn3')(y)
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """`num_units` bottleneck units; the first one may downsample."""
  num_units: int
  features: int
  first_stride: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_units):
      x = BottleneckUnit(self.features, self.first_stride if i == 0 else 1, name=f'unit{i + 1}')(x)
    return x


def resnet_stem(x, num_layers: Sequence[int], width_factor: int = 1):
  """Root conv + max-pool + stages; 224px -> 14x14 with three stages (output stride 16).

  A plain function called inside a parent's `nn.compact` method, so the modules it creates are the parent's
  children: the parameters sit at the top level (`conv_root`, `block1`, ...) as in the published hybrids.
  """
  width = 64 * width_factor
  x = StdConv(width, (7, 7), (2, 2), use_bias=False, name='conv_root')(x)
  x = nn.relu(nn.GroupNorm(name='gn_root')(x))
  x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
  for i, num_units in enumerate(num_layers):
    x = ResNetStage(num_units, width * 2**i, 1 if i == 0 else 2, name=f'block{i + 1}')(x)
  return x


# Depth -> units per stage of the BiT ResNets (Kolesnikov et al., 2020), the paper's CNN baselines.
DEPTHS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class ResNet(nn.Module):
  """BiT-style ResNet classifier (the paper's CNN baseline, Sec. 4.1): the hybrid's stem and stages, global
  average pooling and a zero-initialised head. Input: images in [-1, 1]; output: float32 logits."""
  num_classes: int
  num_layers: Sequence[int]
  width_factor: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    del train  # No dropout or batch statistics: GroupNorm behaves the same in training and evaluation.
    x = resnet_stem(images.astype(self.dtype), self.num_layers, self.width_factor)
    x = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros, name='head')(x)
    return logits.astype(jnp.float32)
