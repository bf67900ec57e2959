"""What a trained ViT learned (paper Sec. 4.5, Fig. 6-7, Appendix D.7-D.8), from its parameters and its
attention weights. Plain numpy/JAX functions; `vit_jax.analyze` draws them.

- `logits`: the model's predictions, jitted as the eval step is;
- `attention_weights`: per-layer attention of a model on images, from the weights its attention layers sow
  (no second model definition);
- `attention_rollout`: attention rollout (Abnar & Zuidema, 2020): heads averaged, identity added for the
  residual, rows renormalised, multiplied through the layers; the map from the output to the patches;
- `position_embedding_similarity`: cosine similarity of each patch's position embedding with all others;
- `mean_attention_distance`: per layer and head, the distance in pixels between query and key patches,
  weighted by attention, averaged over queries and images;
- `embedding_filter_components`: principal components of the patch-embedding filters.
"""
import functools
from typing import List, Tuple

import jax
import numpy as np

from vit_jax import host_cpu
from vit_jax import models


@functools.lru_cache(maxsize=16)
def _jitted_apply(model: models.VisionTransformer, cpu_matmul: str, intermediates: bool):
  """`model.apply` jitted with the CPU matmul library chosen, and kept: jaxlib 0.10.2 can abort when an
  executable with oneDNN dots is destroyed right after its results are ready ("Check failed:
  available_.size() == num_created_" in OneDnnFusionThunk's pool), as a jit made per call is."""
  apply = functools.partial(model.apply, mutable=['intermediates']) if intermediates else model.apply
  return jax.jit(apply, compiler_options=host_cpu.compiler_options(cpu_matmul))


def logits(model: models.VisionTransformer, params, images, cpu_matmul: str = 'onednn') -> np.ndarray:
  """(batch, classes) logits of `model` on `images` (eval mode), jitted with the CPU matmul library chosen."""
  return np.asarray(_jitted_apply(model, cpu_matmul, False)({'params': params}, images))


def attention_weights(model: models.VisionTransformer, params, images,
                      cpu_matmul: str = 'onednn') -> List[np.ndarray]:
  """[layer] -> (batch, heads, tokens, tokens) attention weights of `model` on `images` (eval mode)."""
  _, state = _jitted_apply(model, cpu_matmul, True)({'params': params}, images)
  blocks = state['intermediates']['Transformer']
  if models.SCANNED_BLOCK in blocks:  # One array stacked over layers.
    stacked = np.asarray(blocks[models.SCANNED_BLOCK]['MultiHeadDotProductAttention_1']['attention_weights'][0])
    return list(stacked)
  return [np.asarray(blocks[f'encoderblock_{i}']['MultiHeadDotProductAttention_1']['attention_weights'][0])
          for i in range(model.num_layers)]


def attention_rollout(weights: List[np.ndarray], num_prefix_tokens: int, grid: Tuple[int, int]) -> np.ndarray:
  """(batch, rows, cols) attention from the output to each patch, normalised to sum to 1 per image.

  The output is the [CLS] token's row when the model has one, else the mean over tokens (what GAP reads)."""
  rollout = None
  for layer in weights:
    attention = layer.astype(np.float64).mean(axis=1)  # Average over heads.
    attention = attention + np.eye(attention.shape[-1])  # The residual connection.
    attention /= attention.sum(axis=-1, keepdims=True)
    rollout = attention if rollout is None else attention @ rollout
  readout = rollout[:, 0] if num_prefix_tokens else rollout.mean(axis=1)
  patches = readout[:, num_prefix_tokens:]
  patches = patches / patches.sum(axis=-1, keepdims=True)
  return patches.reshape(-1, *grid)


def position_embedding_similarity(posemb: np.ndarray, grid: Tuple[int, int],
                                  num_prefix_tokens: int) -> np.ndarray:
  """(rows, cols, rows, cols): cosine similarity between the embedding of patch (i, j) and of patch (k, l).

  `posemb` is the (1, tokens, D) table the model adds ([CLS] rows dropped here); works for any grid, so for
  embeddings interpolated to a new resolution too."""
  table = np.asarray(posemb, np.float64).reshape(-1, posemb.shape[-1])[num_prefix_tokens:]
  if table.shape[0] != grid[0] * grid[1]:
    raise ValueError(f'{table.shape[0]} position embeddings do not fill a {grid[0]}x{grid[1]} grid.')
  unit = table / np.maximum(np.linalg.norm(table, axis=-1, keepdims=True), 1e-12)
  return (unit @ unit.T).reshape(*grid, *grid)


def mean_attention_distance(weights: List[np.ndarray], grid: Tuple[int, int], patch_pixels: float,
                            num_prefix_tokens: int) -> np.ndarray:
  """(layers, heads): mean distance in pixels between each query patch and the patches it attends to.

  Only patch-to-patch attention counts ([CLS] has no position), renormalised over the patches."""
  rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing='ij')
  centres = np.stack([rows.ravel(), cols.ravel()], axis=-1) * patch_pixels
  distance = np.linalg.norm(centres[:, None] - centres[None], axis=-1)  # (patches, patches)
  out = []
  for layer in weights:
    attention = layer[:, :, num_prefix_tokens:, num_prefix_tokens:].astype(np.float64)
    attention /= attention.sum(axis=-1, keepdims=True)
    out.append((attention * distance).sum(axis=-1).mean(axis=(0, 2)))  # Over keys; then images, queries.
  return np.stack(out)


def embedding_filter_components(kernel: np.ndarray, num_components: int) -> Tuple[np.ndarray, np.ndarray]:
  """Top principal components of the D patch filters (kernel (P, P, C, D)): ((k, P, P, C), explained variance
  ratio (k,))."""
  patch, _, channels, dim = kernel.shape
  filters = np.asarray(kernel, np.float64).reshape(-1, dim).T  # (D filters, P*P*C)
  filters = filters - filters.mean(axis=0)
  _, singular, components = np.linalg.svd(filters, full_matrices=False)
  variance = singular**2 / np.sum(singular**2)
  k = min(num_components, components.shape[0])
  return components[:k].reshape(k, patch, patch, channels), variance[:k]

