"""What a run learns, chosen once from `config.objective`: classification of labels, or masked patch prediction.

Each objective gives the train and eval steps the same three things: the extra inputs with which the model
creates its parameters, the training loss (and accuracy) of a batch, and the eval sums of a batch (padding
masked out, so that sums add up exactly across batches).
"""
import dataclasses
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vit_jax import config_lib
from vit_jax import errors
from vit_jax import masked_patches
from vit_jax import models


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy against (optionally smoothed) one-hot labels."""
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


@dataclasses.dataclass(frozen=True)
class Classification:
  """Labels from images: cross-entropy against (smoothed) one-hot labels; accuracy of the arg-max."""
  label_smoothing: float = 0.0

  def init_inputs(self, model, image_shape) -> Dict[str, Any]:
    del model, image_shape
    return {}

  def train_loss(self, model, params, batch: Dict[str, jax.Array], rng: jax.Array) -> Tuple[jax.Array, jax.Array]:
    logits = model.apply({'params': params}, batch['image'], train=True, rngs={'dropout': rng})
    loss = jnp.mean(cross_entropy(logits, batch['label'], self.label_smoothing))
    return loss, jnp.mean(jnp.argmax(logits, -1) == batch['label'])

  def eval_sums(self, model, params, batch: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
    logits = model.apply({'params': params}, batch['image'], train=False)
    mask = batch['mask']
    return {'correct': jnp.sum((jnp.argmax(logits, -1) == batch['label']) * mask),
            'loss': jnp.sum(cross_entropy(logits, batch['label']) * mask),
            'count': jnp.sum(mask)}


@dataclasses.dataclass(frozen=True)
class MaskedPatches:
  """The paper's self-supervised pretraining (Sec. 4.6): the mean colour of corrupted patches from the images
  alone (labels unused); "accuracy" is that of the predicted colours, over the corrupted patches."""
  settings: ml_collections.ConfigDict  # `config.masked_patches`.

  def init_inputs(self, model, image_shape) -> Dict[str, Any]:
    num_patches = int(np.prod(model.token_grid(image_shape[:2])))
    return {'corruption': models.PatchCorruption(mask=jnp.zeros((1, num_patches), bool),
                                                 replace_with=jnp.full((1, num_patches), -1))}

  def train_loss(self, model, params, batch: Dict[str, jax.Array], rng: jax.Array) -> Tuple[jax.Array, jax.Array]:
    noise_key, corruption_key = jax.random.split(rng)
    loss, correct, weight = masked_patches.losses(model, params, batch['image'], corruption_key, self.settings,
                                                  train=True, dropout_rng=noise_key)
    count = jnp.maximum(jnp.sum(weight), 1.0)
    return jnp.sum(loss * weight) / count, jnp.sum(correct * weight) / count

  def eval_sums(self, model, params, batch: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
    # A fixed draw of corrupted patches, so that every evaluation scores the same task.
    loss, correct, weight = masked_patches.losses(model, params, batch['image'], jax.random.PRNGKey(0),
                                                  self.settings, train=False)
    weight = weight * batch['mask'][:, None]
    return {'correct': jnp.sum(correct * weight), 'loss': jnp.sum(loss * weight), 'count': jnp.sum(weight)}


def from_config(config: ml_collections.ConfigDict):
  """The objective `config.objective` names, with its settings."""
  if config.objective == 'classification':
    return Classification(label_smoothing=config.label_smoothing)
  if config.objective == 'masked_patches':
    return MaskedPatches(settings=config.masked_patches)
  raise errors.ConfigError(f'Unknown objective {config.objective!r}; choose one of {config_lib.OBJECTIVES}.')
