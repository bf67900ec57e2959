"""Masked patch prediction, the paper's self-supervised pretraining (Sec. 4.6, Appendix B.1.2).

Half of the patch embeddings are corrupted (of those, 80% become a learned [mask] embedding, 10% the
embedding of a random other patch, 10% stay as they are) and the model predicts the 3-bit mean colour of each
corrupted patch (512 classes for RGB, 8 for grey images) from its output token. The main job pretrains this
way with `--config.objective=masked_patches` (settings in `config.masked_patches`; the objective itself is in
`objectives.py`); `--config.init_from` that workdir then fine-tunes as usual (the [mask] embedding and the
prediction head are dropped).
"""
from typing import Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vit_jax import errors
from vit_jax import models


def sample_corruption(rng: jax.Array, batch: int, num_patches: int, config: ml_collections.ConfigDict
                      ) -> Tuple[models.PatchCorruption, jax.Array]:
  """Draws which patches to corrupt and how; returns the corruption and the (batch, patches) bool array of the
  selected (corrupted) patches, the ones whose colour is predicted. Exactly round(fraction * patches) per
  image are selected."""
  select_key, kind_key, source_key = jax.random.split(rng, 3)
  ranks = jnp.argsort(jnp.argsort(jax.random.uniform(select_key, (batch, num_patches)), axis=1), axis=1)
  selected = ranks < round(config.corrupt_fraction * num_patches)
  kind = jax.random.uniform(kind_key, (batch, num_patches))
  mask = selected & (kind < config.mask_prob)
  replaced = selected & (kind >= config.mask_prob) & (kind < config.mask_prob + config.random_prob)
  source = jax.random.randint(source_key, (batch, num_patches), 0, batch * num_patches)
  return models.PatchCorruption(mask=mask, replace_with=jnp.where(replaced, source, -1)), selected


def mean_colour_classes(images: jax.Array, patch_size: int, bits: int = models.MEAN_COLOUR_BITS) -> jax.Array:
  """(batch, patches) class ids of each patch's mean colour, `bits` per channel: images in [-1, 1]."""
  batch, height, width, channels = images.shape
  patches = images.reshape(batch, height // patch_size, patch_size, width // patch_size, patch_size, channels)
  mean = (jnp.mean(patches, axis=(2, 4)).reshape(batch, -1, channels) + 1.0) / 2.0
  levels = 2**bits
  binned = jnp.clip(jnp.floor(mean * levels), 0, levels - 1).astype(jnp.int32)
  return jnp.sum(binned * levels**jnp.arange(channels), axis=-1)


def losses(model: models.VisionTransformer, params, images: jax.Array, rng: jax.Array,
           config: ml_collections.ConfigDict, train: bool, dropout_rng=None):
  """Per-patch cross-entropy, correctness and selection weights (batch, patches): averages are taken over the
  selected patches only."""
  if not isinstance(model, models.VisionTransformer) or model.resnet_layers is not None:
    raise errors.ConfigError('Masked patch prediction needs a ViT (image patches as tokens), not a ResNet or hybrid.')
  grid = model.token_grid(images.shape[1:3])
  corruption, selected = sample_corruption(rng, images.shape[0], grid[0] * grid[1], config)
  logits = model.apply({'params': params}, images, train=train, corruption=corruption,
                       rngs={'dropout': dropout_rng} if dropout_rng is not None else None)
  targets = mean_colour_classes(images, model.patch_size)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = jnp.argmax(logits, -1) == targets
  return loss, correct, selected.astype(jnp.float32)
