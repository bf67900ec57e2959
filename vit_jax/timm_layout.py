"""Our parameters as a PyTorch `state_dict` for timm, and the timm model that computes the same function (used
by `vit_jax.export --format torch`, the logits test and `benchmark --compare timm`).

Everything is inferred from the parameters (width, depth, heads, classifier, stem, head), so any of our
checkpoints converts without its config. Key names are those of timm's `vit_*_patch16_*`,
`vit_base_r50_s16_*` and `resnetv2_*`:

  embedding (P,P,C,D)                          -> patch_embed.proj.weight (D,C,P,P)
  cls / posembed_input/pos_embedding           -> cls_token / pos_embed
  encoderblock_i/LayerNorm_0, LayerNorm_2      -> blocks.i.norm1, blocks.i.norm2
  .../query|key|value (D,heads,D/heads)        -> blocks.i.attn.qkv (3D, D), stacked q, k, v
  .../out (heads,D/heads,D)                    -> blocks.i.attn.proj (D, D)
  .../MlpBlock_3/Dense_0, Dense_1              -> blocks.i.mlp.fc1, fc2 (tanh GELU: `act_layer`)
  encoder_norm / head                          -> norm / head
  pre_logits, head                             -> head.0, head.2 (head = Linear, Tanh, Linear)
  stem_conv_i (conv stem)                      -> patch_embed.backbone.{2i} (Conv2d 3x3 + ReLU)
  conv_root, gn_root, block{n}/unit{m}/conv{k}, gn{k}, conv_proj, gn_proj
      -> [patch_embed.backbone.]stem.conv, stem.norm, stages.{n-1}.blocks.{m-1}.conv{k}, norm{k}, downsample.*
  head of a BiT ResNet                         -> head.fc (1x1 conv)

The ResNet kernels are written already standardised (`resnet.standardize`) and loaded into plain convs with
TensorFlow's SAME padding: timm's StdConv divides by sqrt(var + eps), the published models by std + eps.
Position embeddings other than learned 1-D (`learn_2d`, `sincos_2d`, `none`) are written as the fixed table
our model adds, so timm's learned `pos_embed` reproduces them exactly. Relative position biases and the
masked-patch head have no timm counterpart: those models are refused with the reason.
"""
import functools
from typing import Any, Dict

import flax
import jax
import numpy as np

from vit_jax import models
from vit_jax import resnet

# GroupNorm's epsilon in our ResNet parts (flax's default, as in the published code); timm's hybrids use 1e-5.
GROUP_NORM_EPS = 1e-6


def _conv(kernel: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1)))  # HWIO -> OIHW


def _std_conv(kernel: np.ndarray) -> np.ndarray:
  return _conv(np.asarray(resnet.standardize(kernel)))


def _linear(kernel: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(kernel.T)  # (in, out) -> (out, in)


def _resnet_layers(params) -> tuple:
  return tuple(sum(1 for _ in params[f'block{n}']) for n in range(1, 5) if f'block{n}' in params)


def describe(params: Any) -> Dict[str, Any]:
  """The architecture of a parameter tree: what timm needs to build the same model. Raises, naming the part,
  for what timm cannot express."""
  params = models.unstack_layers(flax.core.unfreeze(params))
  if 'mpp_head' in params:
    raise ValueError('This is a masked-patch-prediction model (mpp_head, no classifier head): fine-tune it '
                     '(--config.init_from=<its workdir>) and export the fine-tuned model.')
  if 'Transformer' not in params:  # A BiT ResNet (the paper's CNN baseline).
    return dict(kind='resnet', num_classes=params['head']['kernel'].shape[1],
                in_chans=params['conv_root']['kernel'].shape[2], resnet_layers=_resnet_layers(params),
                width_factor=params['conv_root']['kernel'].shape[-1] // 64)
  blocks = params['Transformer']
  if any('relative_position_bias' in block.get('MultiHeadDotProductAttention_1', {})
         for block in blocks.values()):
    raise ValueError("This model has relative position biases (posemb 'relative'), which timm's "
                     'VisionTransformer does not have: export it as .npz instead.')
  depth = sum(1 for name in blocks if name.startswith('encoderblock_'))
  attention = blocks['encoderblock_0']['MultiHeadDotProductAttention_1']
  dim, num_heads, _ = attention['query']['kernel'].shape
  mlp_dim = blocks['encoderblock_0']['MlpBlock_3']['Dense_0']['kernel'].shape[1]
  patch, _, _, _ = params['embedding']['kernel'].shape
  stem = 'hybrid' if 'conv_root' in params else 'conv' if 'stem_conv_0' in params else None
  info = dict(kind='vit', embed_dim=dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_dim / dim,
              num_classes=params['head']['kernel'].shape[1], class_token='cls' in params, patch_size=patch,
              in_chans=params['embedding']['kernel'].shape[2], stem=stem,
              representation_size=(params['pre_logits']['kernel'].shape[1] if 'pre_logits' in params
                                   else None))
  if stem == 'hybrid':
    info['in_chans'] = params['conv_root']['kernel'].shape[2]
    info['resnet_layers'] = _resnet_layers(params)
    info['width_factor'] = params['conv_root']['kernel'].shape[-1] // 64
  if stem == 'conv':
    convs = [params[f'stem_conv_{i}']['kernel'] for i in range(sum(1 for k in params if k.startswith('stem_conv_')))]
    info['in_chans'] = convs[0].shape[2]
    info['conv_stem'] = tuple(int(kernel.shape[-1]) for kernel in convs)
  return info


def _resnet_state_dict(params, layers, prefix: str) -> Dict[str, np.ndarray]:
  out = {f'{prefix}stem.conv.weight': _std_conv(params['conv_root']['kernel']),
         f'{prefix}stem.norm.weight': params['gn_root']['scale'], f'{prefix}stem.norm.bias': params['gn_root']['bias']}
  for n, num_units in enumerate(layers):
    for m in range(num_units):
      unit, name = params[f'block{n + 1}'][f'unit{m + 1}'], f'{prefix}stages.{n}.blocks.{m}'
      pairs = [(f'conv{k}', f'gn{k}', f'conv{k}', f'norm{k}') for k in (1, 2, 3)]
      if 'conv_proj' in unit:
        pairs.append(('conv_proj', 'gn_proj', 'downsample.conv', 'downsample.norm'))
      for conv, norm, their_conv, their_norm in pairs:
        out[f'{name}.{their_conv}.weight'] = _std_conv(unit[conv]['kernel'])
        out[f'{name}.{their_norm}.weight'] = unit[norm]['scale']
        out[f'{name}.{their_norm}.bias'] = unit[norm]['bias']
  return out


def state_dict(params: Any, position_embeddings: np.ndarray = None) -> Dict[str, np.ndarray]:
  """timm `state_dict` (numpy arrays) of our parameters. `position_embeddings`: the table our model adds,
  (1, tokens, D), needed only when it has no learned 1-D `pos_embedding` (`models.position_embedding_table`)."""
  info = describe(params)
  params = jax.tree.map(np.asarray, models.unstack_layers(flax.core.unfreeze(params)))
  if info['kind'] == 'resnet':
    out = _resnet_state_dict(params, info['resnet_layers'], '')
    out['head.fc.weight'] = _linear(params['head']['kernel'])[:, :, None, None]
    out['head.fc.bias'] = params['head']['bias']
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}
  out = {}
  blocks = params['Transformer']
  if 'pos_embedding' in blocks.get('posembed_input', {}):
    out['pos_embed'] = blocks['posembed_input']['pos_embedding']
  elif position_embeddings is None:
    raise ValueError('This model adds fixed or 2-D position embeddings: pass the table it adds '
                     '(models.position_embedding_table).')
  else:
    out['pos_embed'] = np.asarray(position_embeddings)
  if info['class_token']:
    out['cls_token'] = params['cls']
  out['patch_embed.proj.weight'] = _conv(params['embedding']['kernel'])
  out['patch_embed.proj.bias'] = params['embedding']['bias']
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
  head = 'head.2' if info['representation_size'] else 'head'
  if info['representation_size']:
    out['head.0.weight'] = _linear(params['pre_logits']['kernel'])
    out['head.0.bias'] = params['pre_logits']['bias']
  out[f'{head}.weight'] = _linear(params['head']['kernel'])
  out[f'{head}.bias'] = params['head']['bias']
  if info['stem'] == 'hybrid':
    out.update(_resnet_state_dict(params, info['resnet_layers'], 'patch_embed.backbone.'))
  if info['stem'] == 'conv':
    for i in range(len(info['conv_stem'])):
      out[f'patch_embed.backbone.{2 * i}.weight'] = _conv(params[f'stem_conv_{i}']['kernel'])
      out[f'patch_embed.backbone.{2 * i}.bias'] = params[f'stem_conv_{i}']['bias']
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def timm_kwargs(info: Dict[str, Any], image_size: int) -> Dict[str, Any]:
  """Arguments of timm's `VisionTransformer` (or `ResNetV2`) for a model `describe`d as `info` (plain JSON
  values; stems, the pre-logits layer and the convolution type are added by `create_model`)."""
  if info['kind'] == 'resnet':
    return dict(layers=list(info['resnet_layers']), num_classes=int(info['num_classes']),
                in_chans=int(info['in_chans']), width_factor=int(info['width_factor']), global_pool='avg',
                preact=False, stem_type='same')
  return dict(img_size=image_size, patch_size=int(info['patch_size']), embed_dim=int(info['embed_dim']),
              depth=info['depth'], num_heads=int(info['num_heads']), mlp_ratio=float(info['mlp_ratio']),
              num_classes=int(info['num_classes']), in_chans=int(info['in_chans']),
              class_token=info['class_token'],
              # GAP: our final LayerNorm comes before the pooling: timm's `norm`, without `fc_norm`.
              global_pool='token' if info['class_token'] else 'avg', fc_norm=False,
              act_layer='gelu_tanh')  # The published models' (and ours) tanh-approximate GELU.


def constructor(info: Dict[str, Any], image_size: int) -> str:
  """The timm call that builds the model (for the export command's message)."""
  kwargs = ', '.join(f'{k}={v!r}' for k, v in timm_kwargs(info, image_size).items())
  if info['kind'] == 'resnet':
    return (f'timm.models.resnetv2.ResNetV2({kwargs}) with plain SAME-padded convolutions and GroupNorm eps '
            f'{GROUP_NORM_EPS} (vit_jax.timm_layout.create_model builds it)')
  extras = {'hybrid': 'the ResNetV2 stem', 'conv': 'the convolutional stem'}.get(info['stem'])
  extras = [f'{extras} as patch_embed.backbone'] if extras else []
  if info['representation_size']:
    extras.append('head = Sequential(Linear, Tanh, Linear) for the pre-logits layer')
  more = f' plus {" and ".join(extras)} (vit_jax.timm_layout.create_model builds it)' if extras else ''
  return f'timm.models.vision_transformer.VisionTransformer({kwargs}){more}'


def create_model(params: Any, image_size: int, position_embeddings: np.ndarray = None):
  """The timm model computing the same function as our model with `params` (eval mode, float32)."""
  import torch  # pylint: disable=g-import-not-at-top  (optional dependency: the `torch` extra)
  from timm.layers import Conv2dSame, GroupNormAct  # pylint: disable=g-import-not-at-top
  from timm.models import resnetv2, vision_transformer, vision_transformer_hybrid  # pylint: disable=g-import-not-at-top
  info = describe(params)
  kwargs = timm_kwargs(info, image_size)
  # The kernels arrive standardised (see the module docstring): plain convolutions, TensorFlow's padding.
  resnet_parts = dict(conv_layer=functools.partial(Conv2dSame, bias=False),
                      norm_layer=functools.partial(GroupNormAct, num_groups=32, eps=GROUP_NORM_EPS))
  if info['kind'] == 'resnet':
    model = resnetv2.ResNetV2(**kwargs, **resnet_parts)
  else:
    if info['stem'] == 'hybrid':
      backbone = resnetv2.ResNetV2(
          layers=list(info['resnet_layers']), num_classes=0, global_pool='', in_chans=info['in_chans'],
          preact=False, stem_type='same', width_factor=info['width_factor'], **resnet_parts)
      kwargs['embed_layer'] = functools.partial(vision_transformer_hybrid.HybridEmbed, backbone=backbone)
    if info['stem'] == 'conv':
      layers, channels = [], info['in_chans']
      for width in info['conv_stem']:
        layers += [torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.ReLU()]
        channels = width
      kwargs['embed_layer'] = functools.partial(vision_transformer_hybrid.HybridEmbed,
                                                backbone=torch.nn.Sequential(*layers))
    model = vision_transformer.VisionTransformer(**kwargs)
    if info['representation_size']:
      model.head = torch.nn.Sequential(torch.nn.Linear(info['embed_dim'], info['representation_size']),
                                       torch.nn.Tanh(),
                                       torch.nn.Linear(info['representation_size'], info['num_classes']))
  weights = state_dict(params, position_embeddings)
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, strict=True)
  return model.eval()
