"""Vision Transformer (Dosovitskiy et al., 2020) and its ResNet hybrid, in Flax linen.

Parameter names and nesting follow the published ViT `.npz` checkpoints, so released weights load and ours
export (`embedding`, `cls`, `Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/...`,
`Transformer/encoder_norm`, `pre_logits`, `head`; hybrids add `conv_root`, `gn_root`, `block{n}/unit{m}`).
The submodules of a block are named explicitly (`LayerNorm_0`, `MultiHeadDotProductAttention_1`,
`LayerNorm_2`, `MlpBlock_3`) because current flax would number them per type, not across types.
"""
import dataclasses
import re
from typing import Any, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import config_lib
from vit_jax import errors
from vit_jax import resnet

# Sizes of the paper (Table 1) and of later work by the same group (Ti, S), plus a micro size for CPUs:
# (hidden_size, mlp_dim, num_heads, num_layers).
SIZES = {
    'mu': (128, 256, 4, 6),
    'Ti': (192, 768, 3, 12),
    'S': (384, 1536, 6, 12),
    'B': (768, 3072, 12, 12),
    'L': (1024, 4096, 16, 24),
    'H': (1280, 5120, 16, 32),
}
# The variants used in the paper; any size above works with any patch size ("ViT-mu/4").
PAPER_VARIANTS = ('ViT-Ti/16', 'ViT-S/16', 'ViT-S/32', 'ViT-B/16', 'ViT-B/32', 'ViT-B/8', 'ViT-L/16',
                  'ViT-L/32', 'ViT-H/14', 'R50+ViT-B/16')
# Hybrid stems: ResNet-50 with stage 4 removed and stage 3 lengthened (paper Appendix B.1).
RESNET_STEMS = {'R50': (3, 4, 9)}
POSEMB_KINDS = config_lib.POSEMB_KINDS
CLASSIFIERS = config_lib.CLASSIFIERS

_VARIANT_RE = re.compile(r'^(?:(?P<stem>R\d+)\+)?(?:ViT-)?(?P<size>[A-Za-z]+)[/_](?P<patch>\d+)$')


def parse_variant(name: str) -> dict:
  """'ViT-B/16', 'B/16', 'ViT-B_16' (published file names) or 'R50+ViT-B/16' -> model keyword arguments."""
  match = _VARIANT_RE.match(name.strip())
  if not match or match['size'] not in SIZES or (match['stem'] and match['stem'] not in RESNET_STEMS):
    raise errors.ConfigError(
        f'Unknown model variant {name!r}. Known variants: {", ".join(PAPER_VARIANTS)}; in general '
        f'"[R50+]ViT-<size>/<patch>" with size one of {", ".join(SIZES)}; ResNet baselines '
        f'"BiT-R<depth>x<width>" (depth {", ".join(map(str, resnet.DEPTHS))}).')
  hidden_size, mlp_dim, num_heads, num_layers = SIZES[match['size']]
  kwargs = dict(hidden_size=hidden_size, mlp_dim=mlp_dim, num_heads=num_heads, num_layers=num_layers,
                patch_size=int(match['patch']))
  if match['stem']:
    kwargs['resnet_layers'] = RESNET_STEMS[match['stem']]
    # The name gives the patch size in pixels; the stem's output stride is 16, so "/16" is patch 1 and
    # "/32" patch 2 over the feature map.
    if kwargs['patch_size'] % 16:
      raise errors.ConfigError(f'Hybrid variant {name!r}: the patch size must be a multiple of the stem stride 16.')
    kwargs['patch_size'] //= 16
  return kwargs


# The CNN baselines: BiT ResNets "BiT-R<depth>x<width>" (e.g. BiT-R50x1); `resnet_layers` overrides the depth.
_RESNET_RE = re.compile(r'^BiT-R(?P<depth>\d+)x(?P<width>\d+)$')
# Options of the ViT that a ResNet does not have: setting one for a ResNet is an error, not ignored.
_VIT_ONLY = ('patch_size', 'hidden_size', 'mlp_dim', 'num_heads', 'num_layers', 'representation_size',
             'conv_stem')


def _get_resnet(match, num_classes: int, overrides: dict) -> resnet.ResNet:
  given = sorted(k for k in _VIT_ONLY if overrides.get(k) is not None)
  given += [k for k in ('remat', 'scan') if overrides.get(k)]
  given += [k for k in ('dropout_rate', 'attention_dropout_rate') if overrides.get(k)]
  if given:
    raise errors.ConfigError(f'{match[0]} is a ResNet: the ViT options {given} do not apply to it; unset them.')
  layers = overrides.get('resnet_layers') or resnet.DEPTHS.get(int(match['depth']))
  if layers is None:
    raise errors.ConfigError(f'Unknown ResNet depth in {match[0]!r}: known depths {sorted(resnet.DEPTHS)}, or set '
                             f'resnet_layers (units per stage).')
  return resnet.ResNet(num_classes=num_classes, num_layers=tuple(layers),
                       width_factor=overrides.get('resnet_width') or int(match['width']),
                       dtype=overrides.get('dtype', jnp.float32))


def get_model(name: str, num_classes: int, **overrides) -> nn.Module:
  """Builds a variant by name; `overrides` replace any field (e.g. `classifier='gap'`, `num_layers=2`).
  "BiT-R<depth>x<width>" builds the ResNet baseline instead (`resnet_layers`, `resnet_width`, `dtype`)."""
  resnet_match = _RESNET_RE.match(name.strip())
  if resnet_match:
    return _get_resnet(resnet_match, num_classes, overrides)
  kwargs = parse_variant(name)
  kwargs.update({k: v for k, v in overrides.items() if v is not None})
  field_names = {f.name for f in dataclasses.fields(VisionTransformer)}
  unknown = set(kwargs) - field_names
  if unknown:
    raise errors.ConfigError(f'Unknown model options {sorted(unknown)}; VisionTransformer takes '
                             f'{sorted(field_names - {"parent", "name"})}.')
  return VisionTransformer(num_classes=num_classes, **kwargs)


def from_config(config, num_classes: int) -> nn.Module:
  """The model a run's config describes (`config.model` fields, `config.dtype`)."""
  overrides = {k: v for k, v in config.model.items() if k != 'name'}
  return get_model(config.model.name, num_classes, dtype=jnp.dtype(config.dtype), **overrides)


def position_embedding_table(model: 'VisionTransformer', params, image_size: int) -> np.ndarray:
  """The (1, tokens, D) table `model` adds to its tokens at `image_size` ([CLS] row included), whatever its
  `posemb` kind: the learned table, the 2-D one assembled from rows and columns, the fixed one, or zeros."""
  grid = model.token_grid((image_size, image_size))
  num_prefix = 1 if model.classifier == 'token' else 0
  layer = AddPositionEmbs(kind=model.posemb, grid=grid, num_prefix_tokens=num_prefix)
  tokens = jnp.zeros((1, num_prefix + grid[0] * grid[1], model.hidden_size))
  learned = unstack_layers(flax.core.unfreeze(params))['Transformer'].get('posembed_input', {})
  return np.asarray(layer.apply({'params': learned} if learned else {}, tokens))


def sincos_2d(grid: Tuple[int, int], dim: int, temperature: float = 10_000.) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding, (h*w, dim): a quarter of the channels per sin/cos x/y."""
  if dim % 4:
    raise errors.ConfigError(f'sincos_2d position embeddings need hidden_size divisible by 4, got {dim}.')
  y, x = np.mgrid[:grid[0], :grid[1]]
  omega = 1. / temperature**(np.arange(dim // 4) / (dim // 4 - 1 or 1))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


class AddPositionEmbs(nn.Module):
  """Adds position embeddings to the tokens; prefix tokens ([CLS]) only get one with `learn_1d`."""
  kind: str
  grid: Tuple[int, int]
  num_prefix_tokens: int

  @nn.compact
  def __call__(self, x):
    num_tokens, dim = x.shape[1:]
    init = nn.initializers.normal(stddev=0.02)
    if self.kind == 'learn_1d':
      # The published layout: one vector per token, [CLS] included, shape (1, N + 1, D).
      return x + self.param('pos_embedding', init, (1, num_tokens, dim)).astype(x.dtype)
    if self.kind in ('none', 'relative'):  # 'relative' acts in the attention layers instead.
      return x
    if self.kind == 'learn_2d':
      # Paper Appendix D.4: X- and Y-embeddings of D/2 each, concatenated.
      row = self.param('pos_embedding_row', init, (self.grid[0], dim // 2))
      col = self.param('pos_embedding_col', init, (self.grid[1], dim - dim // 2))
      posemb = jnp.concatenate([
          jnp.broadcast_to(row[:, None], (*self.grid, row.shape[-1])),
          jnp.broadcast_to(col[None, :], (*self.grid, col.shape[-1]))], axis=-1).reshape(-1, dim)
    elif self.kind == 'sincos_2d':
      posemb = jnp.asarray(sincos_2d(self.grid, dim))
    else:
      raise errors.ConfigError(f'Unknown posemb {self.kind!r}; choose one of {POSEMB_KINDS}.')
    posemb = jnp.pad(posemb, ((self.num_prefix_tokens, 0), (0, 0)))
    return x + posemb[None].astype(x.dtype)


class PatchEmbedding(nn.Module):
  """Linear projection of non-overlapping patches: a convolution with stride = kernel = patch size, with the
  published kernel layout (P, P, C, D), computed as reshape + one matmul (1.6x faster than XLA:CPU's strided
  convolution for ViT-B/16, same result)."""
  features: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    p = self.patch_size
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (p, p, channels, self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    rows, cols = height // p, width // p
    patches = x.reshape(batch, rows, p, cols, p, channels).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(batch, rows, cols, p * p * channels).astype(self.dtype)
    return patches @ kernel.reshape(-1, self.features).astype(self.dtype) + bias.astype(self.dtype)


def relative_offset_index(grid: Tuple[int, int], num_prefix_tokens: int) -> np.ndarray:
  """(N, N) index into a table of (2h-1)(2w-1) + 1 relative-position biases: entry [q, k] numbers the 2-D
  offset from patch k to patch q on the grid; every pair involving a prefix ([CLS]) token shares the last one."""
  rows, cols = np.mgrid[:grid[0], :grid[1]]
  rows, cols = rows.reshape(-1), cols.reshape(-1)
  offsets = ((rows[:, None] - rows[None] + grid[0] - 1) * (2 * grid[1] - 1) +
             cols[:, None] - cols[None] + grid[1] - 1)
  prefix_bucket = (2 * grid[0] - 1) * (2 * grid[1] - 1)
  return np.pad(offsets, ((num_prefix_tokens, 0), (num_prefix_tokens, 0)), constant_values=prefix_bucket)


class MultiHeadSelfAttention(nn.Module):
  """Self-attention with the published parameter layout: query/key/value (D, heads, D/heads), out (heads, D/heads, D).

  The attention weights are sown into the 'intermediates' collection for the analysis tools when that
  collection is mutable (`model.apply(..., mutable=['intermediates'])`); otherwise a fused kernel computes
  the same outputs without materialising them.
  """
  num_heads: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  # With posemb 'relative': the (rows, columns) patch grid and the number of prefix tokens before it.
  relative_grid: Optional[Tuple[int, int]] = None
  num_prefix_tokens: int = 0

  @nn.compact
  def __call__(self, x, deterministic: bool):
    dim = x.shape[-1]
    if dim % self.num_heads:
      raise errors.ConfigError(f'hidden_size {dim} is not divisible by num_heads {self.num_heads}.')
    # Xavier-uniform kernels, as the published models' attention (flax's default would be LeCun-normal).
    dense = lambda name: nn.DenseGeneral((self.num_heads, dim // self.num_heads), dtype=self.dtype,
                                         kernel_init=nn.initializers.xavier_uniform(), name=name)
    query, key, value = dense('query')(x), dense('key')(x), dense('value')(x)
    bias = None
    if self.relative_grid is not None:
      index = relative_offset_index(self.relative_grid, self.num_prefix_tokens)
      rows, cols = self.relative_grid
      table = self.param('relative_position_bias', nn.initializers.zeros,
                         ((2 * rows - 1) * (2 * cols - 1) + 1, self.num_heads))
      bias = jnp.transpose(table[index], (2, 0, 1))[None].astype(self.dtype)  # (1, heads, N, N)
    if self.is_mutable_collection('intermediates') or (self.dropout_rate > 0 and not deterministic):
      # The weights themselves are wanted (analysis) or dropped out: compute them explicitly.
      query = query / jnp.sqrt(query.shape[-1]).astype(query.dtype)
      logits = jnp.einsum('bqhd,bkhd->bhqk', query, key)
      if bias is not None:
        logits = logits + bias
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
      self.sow('intermediates', 'attention_weights', weights)
      weights = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
      out = jnp.einsum('bhqk,bkhd->bqhd', weights, value)
    else:
      # The same function, fused: about 1.8x faster on XLA:CPU than the einsums above (measured, ViT-B/16),
      # which transpose q, k and v to (batch, heads, tokens, dim) and back; cuDNN flash attention on GPUs.
      out = jax.nn.dot_product_attention(query, key, value, bias=bias)
    return nn.DenseGeneral(dim, axis=(-2, -1), dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                           name='out')(out)


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), name=name)
    # The tanh approximation of GELU, as in the code that trained the published checkpoints.
    y = nn.gelu(dense(self.mlp_dim, 'Dense_0')(x), approximate=True)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = dense(x.shape[-1], 'Dense_1')(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class Encoder1DBlock(nn.Module):
  """Pre-LayerNorm transformer block: x + MSA(LN(x)), then x + MLP(LN(x)) (paper Eq. 2-3).

  `scanned`: returns (x, None), the (carry, output) pair that `nn.scan` over layers needs.
  """
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  relative_grid: Optional[Tuple[int, int]] = None
  num_prefix_tokens: int = 0
  scanned: bool = False

  @nn.compact
  def __call__(self, x, deterministic: bool):
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_0')(x)
    y = MultiHeadSelfAttention(self.num_heads, self.attention_dropout_rate, self.dtype, self.relative_grid,
                               self.num_prefix_tokens, name='MultiHeadDotProductAttention_1')(y, deterministic)
    x = x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_2')(x)
    x = x + MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, name='MlpBlock_3')(y, deterministic)
    return (x, None) if self.scanned else x


class Encoder(nn.Module):
  """Position embeddings, dropout, `num_layers` blocks and the final LayerNorm.

  `remat`: recompute each block's activations in the backward pass instead of storing them (less memory,
  about a third more compute). `scan`: one `nn.scan` over the blocks, so XLA compiles one block instead of
  `num_layers`; its parameters are stacked under `encoderblock` (leading axis = layer), which
  `unstack_layers` turns back into the published `encoderblock_{i}` layout and `stack_layers` undoes.
  """
  num_layers: int
  mlp_dim: int
  num_heads: int
  posemb: str
  grid: Tuple[int, int]
  num_prefix_tokens: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  scan: bool = False

  @nn.compact
  def __call__(self, x, deterministic: bool):
    x = AddPositionEmbs(self.posemb, self.grid, self.num_prefix_tokens, name='posembed_input')(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    block = Encoder1DBlock
    if self.remat:
      # Argument 2 (`deterministic`; 0 is the module) is a Python bool that selects code, not data.
      block = nn.remat(block, static_argnums=(2,), prevent_cse=not self.scan)
    relative_grid = tuple(self.grid) if self.posemb == 'relative' else None
    block_args = (self.mlp_dim, self.num_heads, self.dropout_rate, self.attention_dropout_rate, self.dtype,
                  relative_grid, self.num_prefix_tokens)
    if self.scan:
      scanned = nn.scan(block, variable_axes={'params': 0, 'intermediates': 0},
                        split_rngs={'params': True, 'dropout': True}, in_axes=nn.broadcast,
                        length=self.num_layers)
      x, _ = scanned(*block_args, scanned=True, name=SCANNED_BLOCK)(x, deterministic)
    else:
      for i in range(self.num_layers):
        x = block(*block_args, name=f'encoderblock_{i}')(x, deterministic)
    return nn.LayerNorm(dtype=self.dtype, name='encoder_norm')(x)


SCANNED_BLOCK = 'encoderblock'


def unstack_layers(params):
  """Parameters of a `scan=True` model -> the published per-layer layout (`encoderblock_{i}`); other
  parameters (unscanned ViTs, ResNets) unchanged."""
  encoder = dict(params.get('Transformer', {}))
  if SCANNED_BLOCK not in encoder:
    return params
  stacked = encoder.pop(SCANNED_BLOCK)
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(num_layers):
    encoder[f'encoderblock_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return {**params, 'Transformer': encoder}


def stack_layers(params):
  """The published per-layer layout -> parameters of a `scan=True` model (`encoderblock`, layer axis first)."""
  encoder = dict(params['Transformer'])
  names = sorted((k for k in encoder if re.fullmatch(r'encoderblock_\d+', k)), key=lambda k: int(k[13:]))
  if not names:
    return params
  blocks = [encoder.pop(name) for name in names]
  encoder[SCANNED_BLOCK] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return {**params, 'Transformer': encoder}


# Masked patch prediction (paper Sec. 4.6) predicts each corrupted patch's mean colour with this many bits per
# channel: 8**3 = 512 classes for RGB, 8 for grey images.
MEAN_COLOUR_BITS = 3


@flax.struct.dataclass
class PatchCorruption:
  """Which patch embeddings to corrupt, per image and patch (batch, num_patches): `mask` ones become the learned
  [mask] embedding; `replace_with` >= 0 become the embedding at that index of the batch's flattened
  (batch * num_patches) patches; -1 keeps the patch. `vit_jax.masked_patches.sample_corruption` draws them."""
  mask: jax.Array
  replace_with: jax.Array


class VisionTransformer(nn.Module):
  """ViT classifier. Input: images (batch, height, width, channels) in [-1, 1]; output: logits."""
  num_classes: int
  patch_size: int
  hidden_size: int
  mlp_dim: int
  num_heads: int
  num_layers: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  classifier: str = 'token'
  posemb: str = 'learn_1d'
  representation_size: Optional[int] = None
  resnet_layers: Optional[Sequence[int]] = None
  resnet_width: int = 1
  # Convolutional stem: output channels of 3x3 stride-1 convolutions (each + ReLU) applied to the image before
  # the patch embedding, which then projects patches of their feature map (token grid unchanged). Local
  # features that a linear patch projection lacks (cf. Xiao et al. 2021, "Early convolutions help
  # transformers see better"); `configs/default.py` uses two layers of 16. Not part of the published models.
  conv_stem: Optional[Sequence[int]] = None
  dtype: Any = jnp.float32  # Of activations and matmuls; parameters stay float32 (mixed precision).
  remat: bool = False
  scan: bool = False

  def token_grid(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
    """The patch grid (rows, columns) for images of `image_size`: the position-embedding grid."""
    stride = self.patch_size
    if self.resnet_layers is not None:  # Root conv and max-pool stride 2 each, later stages 2 each.
      stride *= 4 * 2**max(len(self.resnet_layers) - 1, 0)
    return tuple(-(-size // stride) for size in image_size)

  @nn.compact
  def __call__(self, images, *, train: bool = False, corruption: Optional[PatchCorruption] = None,
               pre_logits: bool = False):
    """Logits (batch, classes); with `corruption` (masked patch prediction), the mean-colour logits of every
    patch instead, (batch, patches, 2**(MEAN_COLOUR_BITS * channels)), from the `mpp_head` layer; with
    `pre_logits`, the representation the head reads (batch, width), as few-shot evaluation uses it."""
    if self.classifier not in CLASSIFIERS:
      raise errors.ConfigError(f'Unknown classifier {self.classifier!r}; choose one of {CLASSIFIERS}.')
    if self.posemb not in POSEMB_KINDS:
      raise errors.ConfigError(f'Unknown posemb {self.posemb!r}; choose one of {POSEMB_KINDS}.')
    if images.ndim != 4:
      raise errors.ConfigError(f'Expected images of shape (batch, height, width, channels), got {images.shape}.')
    x = images
    if self.resnet_layers is not None:
      x = resnet.resnet_stem(x, self.resnet_layers, self.resnet_width)
    if self.conv_stem and self.resnet_layers is not None:
      raise errors.ConfigError('conv_stem and resnet_layers are two different stems: set only one of them.')
    for i, channels in enumerate(self.conv_stem or ()):
      x = nn.relu(nn.Conv(channels, (3, 3), padding='SAME', dtype=self.dtype, name=f'stem_conv_{i}')(x))
    height, width = x.shape[1:3]
    if height % self.patch_size or width % self.patch_size:
      what = 'ResNet feature map' if self.resnet_layers is not None else 'image size'
      raise errors.ConfigError(
          f'The {what} {height}x{width} is not divisible by the patch size {self.patch_size}: use an image '
          f'size that is a multiple of {self.patch_size} (e.g. {_nearby_multiples(height, self.patch_size)}) '
          f'or a patch size that divides it.')

    x = PatchEmbedding(self.hidden_size, self.patch_size, self.dtype, name='embedding')(x)
    batch, grid_h, grid_w, dim = x.shape
    x = x.reshape(batch, grid_h * grid_w, dim)
    if corruption is not None:
      if self.resnet_layers is not None or self.conv_stem:
        # A stem's receptive field crosses patch borders: neighbouring tokens would see the masked pixels.
        raise errors.ConfigError('Masked patch prediction needs image patches as tokens: use a ViT without a stem '
                                 '(no resnet_layers, no conv_stem), e.g. configs/vit_mu7.py.')
      mask_token = self.param('mask_token', nn.initializers.normal(stddev=0.02), (1, 1, dim))
      swapped = x.reshape(-1, dim)[jnp.maximum(corruption.replace_with, 0)]
      x = jnp.where(corruption.replace_with[..., None] >= 0, swapped, x)
      x = jnp.where(corruption.mask[..., None], mask_token.astype(x.dtype), x)
    num_prefix_tokens = 0
    if self.classifier == 'token':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, dim))
      x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, dim)).astype(x.dtype), x], axis=1)
      num_prefix_tokens = 1

    x = Encoder(self.num_layers, self.mlp_dim, self.num_heads, self.posemb, (grid_h, grid_w),
                num_prefix_tokens, self.dropout_rate, self.attention_dropout_rate, self.dtype, self.remat,
                self.scan, name='Transformer')(x, deterministic=not train)
    if corruption is not None:
      num_colours = 2**(MEAN_COLOUR_BITS * images.shape[-1])
      logits = nn.Dense(num_colours, dtype=self.dtype, name='mpp_head')(x[:, num_prefix_tokens:])
      return logits.astype(jnp.float32)
    x = x[:, 0] if self.classifier == 'token' else jnp.mean(x, axis=1)

    if self.representation_size is not None:
      x = jnp.tanh(nn.Dense(self.representation_size, dtype=self.dtype, name='pre_logits')(x))
    if pre_logits:
      return x.astype(jnp.float32)
    # Zero-initialised head: every class starts equally likely (paper Sec. 3.1, fine-tuning).
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros, name='head')(x)
    return logits.astype(jnp.float32)


def _nearby_multiples(size: int, multiple: int) -> str:
  lower = size // multiple * multiple
  return ' or '.join(str(x) for x in (lower, lower + multiple) if x > 0)


def count_params(model: nn.Module, image_size: int, channels: int = 3) -> int:
  """Parameter count from abstract shapes only (`jax.eval_shape`): no weights are materialised."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, channels)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))
