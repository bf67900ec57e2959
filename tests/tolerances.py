"""Tolerances for the suite's floating-point comparisons, each derived from an error argument.

The error of a comparison is the largest absolute difference over the largest magnitude of the reference,
both over the whole tree (`relative_error`): round-off scales with the computation's magnitudes, not with each
element's, and a value that is zero in exact arithmetic (the key biases' gradients) holds round-off only.

Two float32 computations of one function differ where they sum in another order: another matmul kernel
(XLA's own dot or oneDNN's), another split over threads or devices, a fused or an unfused attention. Each
rounding moves a partial sum by at most the unit round-off u (2**-24 in float32, 2**-8 in bfloat16) of its
magnitude; the roundings of a sum of n terms are close to independent, so their total grows like u * sqrt(n)
(a random walk; the worst case, u * n, is never approached by real kernels). Through a network the errors of
its sums add along the deepest path, so the expected spread of the output is about u * sqrt(N), with N the
number of terms summed along that path (`roundoff`). Each tolerance is `MARGIN` times that, and each test says
how it counts N.

The survey behind the margin (the worst error of each comparison with 1 and 2 threads and both CPU matmul
libraries, against its tolerance) is `tests/tolerance_survey.py`; its table is in docs/tolerances.md.
"""
import json
import math
import os

import jax
import numpy as np

UNIT_ROUNDOFF = {'float64': 2.0**-53, 'float32': 2.0**-24, 'bfloat16': 2.0**-8}

# The model is an expectation, not a bound, and elementwise functions (exp, tanh, rsqrt) are accurate to about
# one ulp (2u), not u: a tolerance is four times the model.
MARGIN = 4.0


# A run resumed from a checkpoint against the same run uninterrupted: one compiled program, one device layout,
# one thread count and the same inputs. XLA:CPU and oneDNN partition their sums statically, so nothing may
# differ: any difference is a resume that did not replay the same steps.
RESUMED_RUN = 0.0


def roundoff(terms: int, dtype: str = 'float32') -> float:
  """Expected relative spread between two summation orders of a computation whose deepest path sums `terms`
  products in `dtype`."""
  return UNIT_ROUNDOFF[dtype] * math.sqrt(terms)


def tolerance(terms: int, dtype: str = 'float32') -> float:
  """`MARGIN` times the expected spread of a computation summing `terms` along its deepest path."""
  return MARGIN * roundoff(terms, dtype)


def vit_terms(*, patch_inputs: int, dim: int, mlp: int, heads: int, tokens: int, layers: int,
              head_inputs: int = None) -> int:
  """Terms summed along a ViT's deepest path: the patch embedding (`patch_inputs` = P * P * channels), per
  block the query/key/value projection (dim), the attention logits (dim / heads), the weighted values
  (tokens), the output projection (dim) and the MLP (dim, then mlp); then the head (or pre-logits + head)."""
  block = dim + dim // heads + tokens + dim + dim + mlp
  return patch_inputs + layers * block + dim + (head_inputs or 0)


def resnet_terms(stages, channels: int = 3, width: int = 64) -> int:
  """Terms summed along a BiT ResNet stem's main path: the 7x7 root convolution, then per bottleneck unit the
  1x1 (its inputs), 3x3 (9 * features) and 1x1 (features) convolutions."""
  terms, inputs = 7 * 7 * channels, width
  for n, units in enumerate(stages):
    features = width * 2**n
    for _ in range(units):
      terms += inputs + 9 * features + features
      inputs = 4 * features
  return terms


def model_terms(model, image_size: int, channels: int) -> int:
  """Terms summed along the deepest path of a model's forward pass on square images: a
  `models.VisionTransformer`, or a BiT `resnet.ResNet` (its stem, the average pool, the head)."""
  if not hasattr(model, 'patch_size'):
    width = 64 * model.width_factor
    pooled = (image_size // 2**(len(model.num_layers) + 1))**2
    return resnet_terms(model.num_layers, channels, width) + pooled + 4 * width * 2**(len(model.num_layers) - 1)
  terms, stem_channels = 0, channels
  if model.resnet_layers is not None:
    width = 64 * model.resnet_width
    terms += resnet_terms(model.resnet_layers, channels, width)
    stem_channels = 4 * width * 2**(len(model.resnet_layers) - 1)
  for features in model.conv_stem or ():
    terms += 9 * stem_channels
    stem_channels = features
  tokens = math.prod(model.token_grid((image_size, image_size))) + (model.classifier == 'token')
  return terms + vit_terms(patch_inputs=model.patch_size**2 * stem_channels, dim=model.hidden_size,
                           mlp=model.mlp_dim, heads=model.num_heads, tokens=tokens, layers=model.num_layers,
                           head_inputs=model.representation_size)


def bfloat16_roundings(model, backward: bool = False) -> int:
  """Roundings to bfloat16 along a ViT's deepest path (matmuls accumulate in float32; each output is rounded
  once): the patch embedding, per block the six sequential matmuls (query/key/value, logits, weighted values,
  output, the MLP's two), the head; twice that with the backward pass."""
  forward = 2 + 6 * model.num_layers
  return 2 * forward if backward else forward


def gradient_terms(model, image_size: int, channels: int, batch: int) -> int:
  """Terms summed along the deepest path of a gradient: the forward pass, the backward pass through the same
  sums, and each weight gradient's sum over every token of the batch."""
  tokens = math.prod(model.token_grid((image_size, image_size))) + 1
  return 2 * model_terms(model, image_size, channels) + batch * tokens


def training_tolerance(config, steps: int, num_classes: int = 10, channels: int = 3) -> float:
  """Parameters after `steps` training steps of `config`, computed in two ways: each step's update may move by
  the spread of its gradient (Adam's update is scale-free, SGD's is at most the learning rate times it, both
  below 1 here), and the steps' spreads add up."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  model = models.from_config(config, num_classes)
  return steps * tolerance(gradient_terms(model, config.image_size, channels, config.batch_size))


def relative_error(actual, expected) -> float:
  """The largest |actual - expected| over the largest |expected|, each over the whole tree."""
  pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64))
           for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)]
  scale = max(float(np.abs(b).max(initial=0)) for _, b in pairs)
  difference = max(float(np.abs(a - b).max(initial=0)) for a, b in pairs)
  return difference / scale if scale else difference


def _record(error: float, limit: float, what: str) -> None:
  path = os.environ.get('VIT_JAX_TOLERANCE_LOG')
  if path:
    test = os.environ.get('PYTEST_CURRENT_TEST', '?').rsplit(' ', 1)[0]
    with open(path, 'a', encoding='utf-8') as f:
      f.write(json.dumps({'test': test, 'what': what, 'error': float(error), 'tolerance': float(limit),
                          'cpu_matmul': os.environ.get('VIT_JAX_TEST_CPU_MATMUL', 'config'),
                          'cpus': len(os.sched_getaffinity(0))}) + '\n')


def assert_close(actual, expected, limit: float, what: str = 'result') -> float:
  """Asserts `relative_error(actual, expected) <= limit`; returns the error."""
  error = relative_error(actual, expected)
  _record(error, limit, what)
  assert error <= limit, f'{what}: relative error {error:.3g} exceeds the tolerance {limit:.3g}'
  return error


def assert_differ(actual, expected, limit: float, what: str = 'result') -> float:
  """Asserts `relative_error(actual, expected) > limit`: a defect the comparison exists to catch shows."""
  error = relative_error(actual, expected)
  assert error > limit, f'{what}: relative error {error:.3g} is within the tolerance {limit:.3g}'
  return error
