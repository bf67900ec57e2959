"""Our parameters as a PyTorch `state_dict` for timm's `VisionTransformer`, and the timm model that computes
the same function (used by `vit_jax.export --format torch`, the logits test and `benchmark --compare timm`).

Everything is inferred from the parameters (width, depth, heads, classifier, stem), so any of our checkpoints
converts without its config. Key names are those of timm's `vit_*_patch16_*` and `vit_base_r50_s16_*`:

  embedding (P,P,C,D)                          -> patch_embed.proj.weight (D,C,P,P)
  cls / posembed_input/pos_embedding           -> cls_token / pos_embed
  encoderblock_i/LayerNorm_0, LayerNorm_2      -> blocks.i.norm1, blocks.i.norm2
  .../query|key|value (D,heads,D/heads)        -> blocks.i.attn.qkv (3D, D), stacked q, k, v
  .../out (heads,D/heads,D)                    -> blocks.i.attn.proj (D, D)
  .../MlpBlock_3/Dense_0, Dense_1              -> blocks.i.mlp.fc1, fc2
  encoder_norm / head                          -> norm / head
  conv_root, gn_root, block{n}/unit{m}/conv{k}, gn{k}, conv_proj, gn_proj
      -> patch_embed.backbone.stem.conv, stem.norm, stages.{n-1}.blocks.{m-1}.conv{k}, norm{k}, downsample.*

Position embeddings other than learned 1-D (`learn_2d`, `sincos_2d`, `none`) are written as the fixed table
our model adds, so timm's learned `pos_embed` reproduces them exactly. timm's ViT has no pre-logits layer:
models with `representation_size` cannot be exported (fine-tune without it, as the paper does).
"""
import functools
from typing import Any, Dict

import flax
import jax
import numpy as np

from vit_jax import models

# Our hybrid stem's epsilons (weight standardisation, GroupNorm), which the timm model is built with so that
# it computes exactly our function (timm's own hybrids use 1e-8 and 1e-5).
STD_CONV_EPS = 1e-5
GROUP_NORM_EPS = 1e-6


def _conv(kernel: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1)))  # HWIO -> OIHW


def _linear(kernel: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(kernel.T)  # (in, out) -> (out, in)


def describe(params: Any) -> Dict[str, Any]:
  """The architecture of a parameter tree: what timm needs to build the same model."""
  params = models.unstack_layers(flax.core.unfreeze(params))
  if 'pre_logits' in params:
    raise ValueError('timm\'s VisionTransformer has no pre-logits (representation) layer: export a model '
                     'trained with --config.model.representation_size=None.')
  if 'stem_conv_0' in params:
    raise ValueError("This model has a convolutional stem (conv_stem), which timm's VisionTransformer does not "
                     'have: export it as .npz instead.')
  blocks = params['Transformer']
  depth = sum(1 for name in blocks if name.startswith('encoderblock_'))
  attention = blocks['encoderblock_0']['MultiHeadDotProductAttention_1']
  dim, num_heads, _ = attention['query']['kernel'].shape
  mlp_dim = blocks['encoderblock_0']['MlpBlock_3']['Dense_0']['kernel'].shape[1]
  patch, _, in_chans, _ = params['embedding']['kernel'].shape
  info = dict(embed_dim=dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_dim / dim,
              num_classes=params['head']['kernel'].shape[1], class_token='cls' in params, patch_size=patch,
              in_chans=in_chans, hybrid='conv_root' in params)
  if info['hybrid']:
    info['in_chans'] = params['conv_root']['kernel'].shape[2]
    info['resnet_layers'] = tuple(sum(1 for u in params[f'block{n}']) for n in range(1, 5)
                                  if f'block{n}' in params)
    info['width_factor'] = params['conv_root']['kernel'].shape[-1] // 64
  return info


def state_dict(params: Any, position_embeddings: np.ndarray = None) -> Dict[str, np.ndarray]:
  """timm `state_dict` (numpy arrays) of our parameters. `position_embeddings`: the table our model adds,
  (1, tokens, D), needed only when it has no learned 1-D `pos_embedding` (`models.position_embedding_table`)."""
  info = describe(params)
  params = jax.tree.map(np.asarray, models.unstack_layers(flax.core.unfreeze(params)))
  out = {}
  blocks = params['Transformer']
  if any('relative_position_bias' in block.get('MultiHeadDotProductAttention_1', {})
         for block in blocks.values()):
    raise ValueError("This model has relative position biases (posemb 'relative'), which timm's "
                     'VisionTransformer does not have: export it as .npz instead.')
  if 'pos_embedding' in blocks.get('posembed_input', {}):
    out['pos_embed'] = blocks['posembed_input']['pos_embedding']
  elif position_embeddings is None:
    raise ValueError('This model adds fixed or 2-D position embeddings: pass the table it adds '
                     '(models.position_embedding_table).')
  else:
    out['pos_embed'] = np.asarray(position_embeddings)
  if info['class_token']:
    out['cls_token'] = params['cls']
  prefix = 'patch_embed.proj'
  out[f'{prefix}.weight'] = _conv(params['embedding']['kernel'])
  out[f'{prefix}.bias'] = params['embedding']['bias']
  for i in range(info['depth']):
    block, name = blocks[f'encoderblock_{i}'], f'blocks.{i}'
    attention = block['MultiHeadDotProductAttention_1']
    out[f'{name}.norm1.weight'] = block['LayerNorm_0']['scale']
    out[f'{name}.norm1.bias'] = block['LayerNorm_0']['bias']
    out[f'{name}.attn.qkv.weight'] = np.concatenate(
        [attention[k]['kernel'].reshape(info['embed_dim'], -1).T for k in ('query', 'key', 'value')], axis=0)
    out[f'{name}.attn.qkv.bias'] = np.concatenate(
        [attention[k]['bias'].reshape(-1) for k in ('query', 'key', 'value')])
    out[f'{name}.attn.proj.weight'] = _linear(attention['out']['kernel'].reshape(-1, info['embed_dim']))
    out[f'{name}.attn.proj.bias'] = attention['out']['bias']
    out[f'{name}.norm2.weight'] = block['LayerNorm_2']['scale']
    out[f'{name}.norm2.bias'] = block['LayerNorm_2']['bias']
    for ours, theirs in (('Dense_0', 'fc1'), ('Dense_1', 'fc2')):
      out[f'{name}.mlp.{theirs}.weight'] = _linear(block['MlpBlock_3'][ours]['kernel'])
      out[f'{name}.mlp.{theirs}.bias'] = block['MlpBlock_3'][ours]['bias']
  out['norm.weight'] = blocks['encoder_norm']['scale']
  out['norm.bias'] = blocks['encoder_norm']['bias']
  out['head.weight'] = _linear(params['head']['kernel'])
  out['head.bias'] = params['head']['bias']
  if info['hybrid']:
    stem = 'patch_embed.backbone'
    out[f'{stem}.stem.conv.weight'] = _conv(params['conv_root']['kernel'])
    out[f'{stem}.stem.norm.weight'] = params['gn_root']['scale']
    out[f'{stem}.stem.norm.bias'] = params['gn_root']['bias']
    for n, num_units in enumerate(info['resnet_layers']):
      for m in range(num_units):
        unit, name = params[f'block{n + 1}'][f'unit{m + 1}'], f'{stem}.stages.{n}.blocks.{m}'
        pairs = [(f'conv{k}', f'gn{k}', f'conv{k}', f'norm{k}') for k in (1, 2, 3)]
        if 'conv_proj' in unit:
          pairs.append(('conv_proj', 'gn_proj', 'downsample.conv', 'downsample.norm'))
        for conv, norm, their_conv, their_norm in pairs:
          out[f'{name}.{their_conv}.weight'] = _conv(unit[conv]['kernel'])
          out[f'{name}.{their_norm}.weight'] = unit[norm]['scale']
          out[f'{name}.{their_norm}.bias'] = unit[norm]['bias']
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def timm_kwargs(info: Dict[str, Any], image_size: int) -> Dict[str, Any]:
  """Arguments of timm's `VisionTransformer` for a model `describe`d as `info` (plain JSON values; the hybrid
  also needs its ResNet stem, which `create_model` adds)."""
  return dict(img_size=image_size, patch_size=int(info['patch_size']), embed_dim=int(info['embed_dim']),
              depth=info['depth'], num_heads=int(info['num_heads']), mlp_ratio=float(info['mlp_ratio']),
              num_classes=int(info['num_classes']), in_chans=int(info['in_chans']),
              class_token=info['class_token'],
              # GAP: our final LayerNorm comes before the pooling: timm's `norm`, without `fc_norm`.
              global_pool='token' if info['class_token'] else 'avg', fc_norm=False)


def create_model(params: Any, image_size: int, position_embeddings: np.ndarray = None):
  """timm's `VisionTransformer` computing the same function as our model with `params` (eval mode, float32)."""
  import torch  # pylint: disable=g-import-not-at-top  (optional dependency: the `torch` extra)
  from timm.layers import GroupNormAct, StdConv2dSame  # pylint: disable=g-import-not-at-top
  from timm.models import resnetv2, vision_transformer, vision_transformer_hybrid  # pylint: disable=g-import-not-at-top
  info = describe(params)
  kwargs = timm_kwargs(info, image_size)
  if info['hybrid']:
    backbone = resnetv2.ResNetV2(
        layers=list(info['resnet_layers']), num_classes=0, global_pool='', in_chans=info['in_chans'],
        preact=False, stem_type='same', width_factor=info['width_factor'],
        conv_layer=functools.partial(StdConv2dSame, eps=STD_CONV_EPS),
        norm_layer=functools.partial(GroupNormAct, num_groups=32, eps=GROUP_NORM_EPS))
    kwargs['embed_layer'] = functools.partial(vision_transformer_hybrid.HybridEmbed, backbone=backbone)
  model = vision_transformer.VisionTransformer(**kwargs)
  weights = state_dict(params, position_embeddings)
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, strict=True)
  return model.eval()
