"""Our models compute the functions of the published ViT and hybrid checkpoints: weights in the published
layout, run through a reference implementation written here from the published definitions (not our modules),
give our logits; and each numeric detail of docs/published_functions.md holds."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances
from vit_jax import checkpoints
from vit_jax import models
from vit_jax import resnet

# ------------------------------------------------------------------ the reference, from the published definitions


def _layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps) * p['scale'] + p['bias']


def _gelu_tanh(x):
  return 0.5 * x * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _conv(x, kernel, stride=1, bias=None):
  out = jax.lax.conv_general_dilated(x, kernel, (stride, stride), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                     precision=jax.lax.Precision.HIGHEST)
  return out if bias is None else out + bias


def _std_conv(x, kernel, stride=1):
  kernel = kernel - kernel.mean((0, 1, 2), keepdims=True)
  kernel = kernel / (kernel.std((0, 1, 2), keepdims=True) + 1e-5)
  return _conv(x, kernel, stride)


def _group_norm(x, p, groups=32, eps=1e-6):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean((1, 2, 4), keepdims=True)
  var = ((g - mean)**2).mean((1, 2, 4), keepdims=True)
  return ((g - mean) / jnp.sqrt(var + eps)).reshape(b, h, w, c) * p['scale'] + p['bias']


def _attention(x, p, heads):
  proj = lambda name: jnp.einsum('btd,dhk->bthk', x, p[name]['kernel']) + p[name]['bias']
  q, k, v = proj('query'), proj('key'), proj('value')
  logits = jnp.einsum('bqhk,bthk->bhqt', q / math.sqrt(q.shape[-1]), k)
  out = jnp.einsum('bhqt,bthk->bqhk', jax.nn.softmax(logits, -1), v)
  return jnp.einsum('bqhk,hkd->bqd', out, p['out']['kernel']) + p['out']['bias']


def _unit(x, p, stride):
  residual = x
  if 'conv_proj' in p:
    residual = _group_norm(_std_conv(x, p['conv_proj']['kernel'], stride), p['gn_proj'])
  y = jax.nn.relu(_group_norm(_std_conv(x, p['conv1']['kernel']), p['gn1']))
  y = jax.nn.relu(_group_norm(_std_conv(y, p['conv2']['kernel'], stride), p['gn2']))
  y = _group_norm(_std_conv(y, p['conv3']['kernel']), p['gn3'])
  return jax.nn.relu(residual + y)


def reference_logits(params, images, patch, heads):
  """The published ViT (and R50 hybrid) forward pass, evaluation mode, [CLS] classifier."""
  x = images
  if 'conv_root' in params:
    x = jax.nn.relu(_group_norm(_std_conv(x, params['conv_root']['kernel'], 2), params['gn_root']))
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), 'SAME')
    for n in range(1, 5):
      for m in range(1, len(params.get(f'block{n}', {})) + 1):
        x = _unit(x, params[f'block{n}'][f'unit{m}'], 2 if (m == 1 and n > 1) else 1)
  x = _conv(x, params['embedding']['kernel'], patch, params['embedding']['bias'])
  b, h, w, d = x.shape
  x = x.reshape(b, h * w, d)
  x = jnp.concatenate([jnp.broadcast_to(params['cls'], (b, 1, d)), x], axis=1)
  encoder = params['Transformer']
  x = x + encoder['posembed_input']['pos_embedding']
  for i in range(sum(1 for k in encoder if k.startswith('encoderblock_'))):
    block = encoder[f'encoderblock_{i}']
    x = x + _attention(_layer_norm(x, block['LayerNorm_0']), block['MultiHeadDotProductAttention_1'], heads)
    y = _layer_norm(x, block['LayerNorm_2'])
    mlp = block['MlpBlock_3']
    y = _gelu_tanh(y @ mlp['Dense_0']['kernel'] + mlp['Dense_0']['bias'])
    x = x + y @ mlp['Dense_1']['kernel'] + mlp['Dense_1']['bias']
  x = _layer_norm(x, encoder['encoder_norm'])[:, 0]
  if 'pre_logits' in params:
    x = jnp.tanh(x @ params['pre_logits']['kernel'] + params['pre_logits']['bias'])
  return x @ params['head']['kernel'] + params['head']['bias']


def published_layout(rng, *, patch, channels, dim, heads, mlp, layers, tokens, classes, representation=None,
                     resnet_stages=None):
  """Random weights under the published checkpoints' names and shapes (as in `ViT-B_16.npz`)."""
  shapes = {'cls': (1, 1, dim), 'embedding/kernel': (patch, patch, channels, dim), 'embedding/bias': (dim,),
            'Transformer/posembed_input/pos_embedding': (1, tokens, dim), 'head/kernel': (dim, classes),
            'head/bias': (classes,)}
  for name in ('scale', 'bias'):
    shapes[f'Transformer/encoder_norm/{name}'] = (dim,)
  for i in range(layers):
    block = f'Transformer/encoderblock_{i}'
    for norm in ('LayerNorm_0', 'LayerNorm_2'):
      shapes.update({f'{block}/{norm}/scale': (dim,), f'{block}/{norm}/bias': (dim,)})
    attention = f'{block}/MultiHeadDotProductAttention_1'
    for name in ('query', 'key', 'value'):
      shapes.update({f'{attention}/{name}/kernel': (dim, heads, dim // heads),
                     f'{attention}/{name}/bias': (heads, dim // heads)})
    shapes.update({f'{attention}/out/kernel': (heads, dim // heads, dim), f'{attention}/out/bias': (dim,),
                   f'{block}/MlpBlock_3/Dense_0/kernel': (dim, mlp), f'{block}/MlpBlock_3/Dense_0/bias': (mlp,),
                   f'{block}/MlpBlock_3/Dense_1/kernel': (mlp, dim), f'{block}/MlpBlock_3/Dense_1/bias': (dim,)})
  if representation:
    shapes.update({'pre_logits/kernel': (dim, representation), 'pre_logits/bias': (representation,),
                   'head/kernel': (representation, classes)})
  if resnet_stages:
    width = 64
    shapes.update({'conv_root/kernel': (7, 7, 3, width), 'gn_root/scale': (width,), 'gn_root/bias': (width,)})
    in_features = width
    for n, units in enumerate(resnet_stages, 1):
      features = width * 2**(n - 1)
      for m in range(1, units + 1):
        unit = f'block{n}/unit{m}'
        shapes.update({f'{unit}/conv1/kernel': (1, 1, in_features, features),
                       f'{unit}/conv2/kernel': (3, 3, features, features),
                       f'{unit}/conv3/kernel': (1, 1, features, 4 * features)})
        if m == 1:
          shapes[f'{unit}/conv_proj/kernel'] = (1, 1, in_features, 4 * features)
        for k in (('gn1', features), ('gn2', features), ('gn3', 4 * features)) + (
            (('gn_proj', 4 * features),) if m == 1 else ()):
          shapes.update({f'{unit}/{k[0]}/scale': (k[1],), f'{unit}/{k[0]}/bias': (k[1],)})
        in_features = 4 * features
    shapes['embedding/kernel'] = (patch, patch, in_features, dim)
  keys = jax.random.split(rng, len(shapes))
  flat = {}
  for key, (name, shape) in zip(keys, sorted(shapes.items())):
    scale = 1.0 if name.endswith('/scale') else 0.3 if 'kernel' not in name else 1 / math.sqrt(np.prod(shape[:-1]))
    offset = 1.0 if name.endswith('/scale') else 0.0
    flat[name] = np.asarray(offset + scale * jax.random.normal(key, shape), np.float32)
  return checkpoints.unflatten(flat)


CASES = {
    'ViT (B/16 block, smaller)': dict(model=dict(name='ViT-mu/8', hidden_size=96, mlp_dim=384, num_heads=6,
                                                 num_layers=3, representation_size=32),
                                      layout=dict(patch=8, channels=3, dim=96, heads=6, mlp=384, layers=3,
                                                  tokens=17, classes=11, representation=32), image=32),
    'R50+ViT hybrid': dict(model=dict(name='R50+ViT-B/16', hidden_size=64, mlp_dim=128, num_heads=4,
                                      num_layers=2, resnet_layers=(1, 2, 1)),
                           layout=dict(patch=1, channels=3, dim=64, heads=4, mlp=128, layers=2, tokens=5,
                                       classes=11, resnet_stages=(1, 2, 1)), image=32),
}


def _erf_gelu(x, approximate=True):
  del approximate
  return 0.5 * x * (1 + jax.scipy.special.erf(x / math.sqrt(2)))


def _sqrt_var_standardize(kernel, eps=resnet.STD_CONV_EPS):
  return (kernel - kernel.mean((0, 1, 2))) / jnp.sqrt(kernel.var((0, 1, 2)) + eps)


# The defects each comparison exists to catch: the exact (erf) GELU in every MLP, and weight standardisation by
# sqrt(var + eps) in every convolution of the ResNet stem.
MUTANTS = {'erf GELU': (models.nn, 'gelu', _erf_gelu),
           'sqrt(var + eps) standardisation': (resnet, 'standardize', _sqrt_var_standardize)}


@pytest.mark.parametrize('case', [pytest.param(case, marks=pytest.mark.slow) if 'R50' in case else case
                                  for case in CASES])  # The ResNet stem compiles slowly.
def test_our_logits_equal_the_published_functions_on_published_weights(case, monkeypatch):
  spec = CASES[case]
  layout = spec['layout']
  params = published_layout(jax.random.PRNGKey(0), **layout)
  model = models.get_model(spec['model']['name'], layout['classes'],
                           **{k: v for k, v in spec['model'].items() if k != 'name'})
  images = jax.random.uniform(jax.random.PRNGKey(1), (4, spec['image'], spec['image'], 3), minval=-1, maxval=1)
  with jax.enable_x64(True):  # The reference in float64: what remains is our float32 round-off.
    as64 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float64), tree)
    expected = np.asarray(reference_logits(as64(params), as64(images), layout['patch'], layout['heads']))
  assert np.abs(expected).max() > 0.1 and not np.allclose(expected[0], expected[1])
  # The deepest path: the ResNet stem's convolutions (hybrid), the patch embedding, every block, the head.
  terms = tolerances.model_terms(model, spec['image'], layout['channels'])
  limit = tolerances.tolerance(terms)
  tolerances.assert_close(model.apply({'params': params}, images), expected, limit, 'logits')
  # The tolerance still catches each defect that applies to the model.
  for mutant, (module, name, function) in MUTANTS.items():
    if name == 'standardize' and 'resnet_stages' not in layout:
      continue
    with monkeypatch.context() as patch:
      patch.setattr(module, name, function)
      tolerances.assert_differ(model.apply({'params': params}, images), expected, limit, mutant)


# ------------------------------------------------------------------------------- one numeric detail at a time


def test_mlp_uses_the_tanh_approximate_gelu():
  block = models.MlpBlock(mlp_dim=4)
  x = jnp.linspace(-4, 4, 4 * 5).reshape(5, 4)
  identity = {'Dense_0': {'kernel': jnp.eye(4), 'bias': jnp.zeros(4)},
              'Dense_1': {'kernel': jnp.eye(4), 'bias': jnp.zeros(4)}}
  out = block.apply({'params': identity}, x, deterministic=True)
  # Elementwise, no sums: a few roundings of x**3, tanh and the products (identity dense layers sum 4 terms).
  tolerances.assert_close(out, _gelu_tanh(x), tolerances.tolerance(4), 'tanh GELU')
  tolerances.assert_differ(out, _erf_gelu(x), 100 * tolerances.tolerance(4), 'erf GELU')  # Not the erf form.


def test_weight_standardisation_divides_by_std_plus_eps():
  kernel = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 4, 8)) * 0.01  # Small std: eps matters.
  expected = (kernel - kernel.mean((0, 1, 2))) / (kernel.std((0, 1, 2)) + 1e-5)
  # Mean and std over the 3 * 3 * 4 inputs of each output.
  tolerances.assert_close(resnet.standardize(kernel), expected, tolerances.tolerance(3 * 3 * 4), 'kernel')
  conv = resnet.StdConv(8, (3, 3), use_bias=False)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 6, 4))
  # The standardisation's sums, then the convolution's 3 * 3 * 4.
  tolerances.assert_close(conv.apply({'params': {'kernel': kernel}}, x), _conv(x, expected),
                          tolerances.tolerance(2 * 3 * 3 * 4), 'convolution')
  tolerances.assert_differ(resnet.standardize(kernel), _sqrt_var_standardize(kernel),
                           100 * tolerances.tolerance(3 * 3 * 4), 'sqrt(var + eps)')  # Not sqrt(var + eps).


def test_initialisers_follow_the_published_models():
  """Matters for training from scratch: the published code's initialisers, module by module."""
  dim, mlp = 256, 512
  model = models.get_model('ViT-mu/4', 10, hidden_size=dim, mlp_dim=mlp, num_heads=4, num_layers=1)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))['params']
  block = params['Transformer']['encoderblock_0']

  def xavier_uniform(kernel, fan_in, fan_out):
    bound = math.sqrt(6 / (fan_in + fan_out))
    return np.abs(kernel).max() <= bound and abs(np.std(kernel) - bound / math.sqrt(3)) < 0.05 * bound

  attention = block['MultiHeadDotProductAttention_1']
  assert all(xavier_uniform(attention[k]['kernel'], dim, dim) for k in ('query', 'key', 'value', 'out'))
  assert all(not np.any(attention[k]['bias']) for k in ('query', 'key', 'value', 'out'))
  assert xavier_uniform(block['MlpBlock_3']['Dense_0']['kernel'], dim, mlp)
  assert xavier_uniform(block['MlpBlock_3']['Dense_1']['kernel'], mlp, dim)
  assert 0 < np.std(block['MlpBlock_3']['Dense_0']['bias']) < 1e-5  # normal(stddev=1e-6).
  posemb = params['Transformer']['posembed_input']['pos_embedding']
  assert abs(np.std(posemb) - 0.02) < 0.002  # normal(stddev=0.02), from BERT.
  fan_in = 4 * 4 * 3  # LeCun normal (flax's Conv default) for the patch embedding.
  assert abs(np.std(params['embedding']['kernel']) - 1 / math.sqrt(fan_in)) < 0.1 / math.sqrt(fan_in)
  assert not np.any(params['cls']) and not np.any(params['head']['kernel']) and not np.any(params['head']['bias'])
  for norm in (block['LayerNorm_0'], params['Transformer']['encoder_norm']):
    assert np.all(norm['scale'] == 1) and not np.any(norm['bias'])


def test_layer_norm_epsilon_is_the_published_one():
  """flax's default, 1e-6: visible on inputs of tiny variance, where eps dominates."""
  block = models.Encoder1DBlock(mlp_dim=8, num_heads=1)
  x = 1e-3 * jax.random.normal(jax.random.PRNGKey(0), (1, 3, 4))
  params = block.init(jax.random.PRNGKey(1), x, deterministic=True)['params']
  _, state = block.apply({'params': params}, x, deterministic=True, capture_intermediates=True)
  normed = state['intermediates']['LayerNorm_0']['__call__'][0]
  # Mean and variance over 4 features.
  tolerances.assert_close(normed, _layer_norm(x, {'scale': 1.0, 'bias': 0.0}, eps=1e-6), tolerances.tolerance(2 * 4),
                          'normalised')


def test_position_embedding_resize_is_the_published_corner_aligned_linear_zoom():
  old, new, dim = 3, 5, 2
  grid = jax.random.normal(jax.random.PRNGKey(0), (old, old, dim))
  posemb = np.concatenate([np.full((1, 1, dim), 9.0), np.asarray(grid).reshape(1, old * old, dim)], axis=1)
  resized = checkpoints.resize_posemb(posemb.astype(np.float32), (new, new), num_prefix_tokens=1)
  # Corner-aligned linear interpolation: new position i samples old position i * (old - 1) / (new - 1).
  coords = np.arange(new) * (old - 1) / (new - 1)
  low = np.minimum(np.floor(coords).astype(int), old - 2)
  frac = coords - low
  along_y = grid[low] * (1 - frac)[:, None, None] + grid[low + 1] * frac[:, None, None]
  expected = along_y[:, low] * (1 - frac)[None, :, None] + along_y[:, low + 1] * frac[None, :, None]
  # Bilinear: each value a sum of 4 weighted neighbours.
  tolerances.assert_close(resized[0, 1:].reshape(new, new, dim), expected, tolerances.tolerance(4), 'grid')
  assert np.all(resized[0, 0] == 9.0)
