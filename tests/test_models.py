"""The ViT and hybrid models: the paper's parameter counts, the published layout, every option's shapes."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances
from vit_jax import models

# Exact counts of the published architectures with a 1000-class head and no pre-logits (PAPER.md).
PAPER_PARAM_COUNTS = {
    'ViT-Ti/16': 5_717_416,
    'ViT-S/16': 22_050_664,
    'ViT-B/16': 86_567_656,
    'ViT-B/32': 88_224_232,
    'ViT-B/8': 86_576_872,
    'ViT-L/16': 304_326_632,
    'ViT-L/32': 306_535_400,
    'ViT-H/14': 632_045_800,
    'R50+ViT-B/16': 98_659_112,
}


def _abstract_params(model, image_size, channels=3):
  images = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), images)['params']


@pytest.mark.parametrize('name,expected', sorted(PAPER_PARAM_COUNTS.items()))
def test_paper_parameter_counts(name, expected):
  assert models.count_params(models.get_model(name, num_classes=1000), image_size=224) == expected


@pytest.mark.slow
def test_every_paper_variant_has_a_registry_entry_and_output_shape():
  for name in models.PAPER_VARIANTS:
    model = models.get_model(name, num_classes=7)
    params = _abstract_params(model, 224)
    logits = jax.eval_shape(lambda p, x, m=model: m.apply({'params': p}, x), params,
                            jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    assert logits.shape == (2, 7), name


def test_published_checkpoint_layout_of_vit_b16():
  params = _abstract_params(models.get_model('ViT-B/16', 1000, representation_size=768), 224)
  flat = {'/'.join(k): v.shape for k, v in flax.traverse_util.flatten_dict(params).items()}
  block = 'Transformer/encoderblock_11'
  expected = {
      'embedding/kernel': (16, 16, 3, 768), 'embedding/bias': (768,), 'cls': (1, 1, 768),
      'Transformer/posembed_input/pos_embedding': (1, 197, 768),
      f'{block}/LayerNorm_0/scale': (768,), f'{block}/LayerNorm_2/bias': (768,),
      f'{block}/MultiHeadDotProductAttention_1/query/kernel': (768, 12, 64),
      f'{block}/MultiHeadDotProductAttention_1/key/bias': (12, 64),
      f'{block}/MultiHeadDotProductAttention_1/out/kernel': (12, 64, 768),
      f'{block}/MlpBlock_3/Dense_0/kernel': (768, 3072), f'{block}/MlpBlock_3/Dense_1/kernel': (3072, 768),
      'Transformer/encoder_norm/scale': (768,), 'pre_logits/kernel': (768, 768), 'head/kernel': (768, 1000),
  }
  for key, shape in expected.items():
    assert flat.get(key) == shape, key
  assert 'Transformer/encoderblock_12/LayerNorm_0/scale' not in flat


def test_hybrid_layout_and_14x14_token_grid():
  params = _abstract_params(models.get_model('R50+ViT-B/16', 1000), 224)
  flat = {'/'.join(k): v.shape for k, v in flax.traverse_util.flatten_dict(params).items()}
  assert flat['conv_root/kernel'] == (7, 7, 3, 64)
  assert flat['gn_root/scale'] == (64,)
  assert flat['block1/unit1/conv_proj/kernel'] == (1, 1, 64, 256)
  assert flat['block3/unit9/conv3/kernel'] == (1, 1, 256, 1024)
  assert 'block3/unit10/conv1/kernel' not in flat and 'block4/unit1/conv1/kernel' not in flat
  assert flat['embedding/kernel'] == (1, 1, 1024, 768)  # Patch size 1 over the 14x14x1024 feature map.
  assert flat['Transformer/posembed_input/pos_embedding'] == (1, 14 * 14 + 1, 768)


def _tiny(**overrides):
  kwargs = dict(hidden_size=32, mlp_dim=64, num_heads=4, num_layers=2)
  kwargs.update(overrides)
  return models.get_model('ViT-B/4', num_classes=5, **kwargs)


@pytest.mark.parametrize('classifier', models.CLASSIFIERS)
@pytest.mark.parametrize('posemb', models.POSEMB_KINDS)
def test_classifiers_and_position_embeddings_run(classifier, posemb):
  model = _tiny(classifier=classifier, posemb=posemb, representation_size=16, dropout_rate=0.1)
  images = jax.random.uniform(jax.random.PRNGKey(1), (3, 16, 12, 3), minval=-1, maxval=1)  # 4x3 patches.
  variables = model.init(jax.random.PRNGKey(0), images)
  logits = model.apply(variables, images)
  assert logits.shape == (3, 5)
  assert np.all(np.asarray(logits) == 0), 'The head is zero-initialised.'
  # With a non-zero head, the outputs depend on the input and dropout acts only in training.
  params = jax.tree.map(lambda x: x, variables['params'])
  params['head']['kernel'] = jnp.ones_like(params['head']['kernel'])
  eval_logits = model.apply({'params': params}, images)
  assert not np.allclose(eval_logits[0], eval_logits[1])
  train_logits = model.apply({'params': params}, images, train=True, rngs={'dropout': jax.random.PRNGKey(2)})
  assert not np.allclose(train_logits, eval_logits)
  has_cls = 'cls' in variables['params']
  assert has_cls == (classifier == 'token')
  posemb_params = variables['params']['Transformer'].get('posembed_input', {})
  tokens = 12 + has_cls
  expected = {'learn_1d': {'pos_embedding': (1, tokens, 32)},
              'learn_2d': {'pos_embedding_row': (4, 16), 'pos_embedding_col': (3, 16)},
              'sincos_2d': {}, 'relative': {}, 'none': {}}[posemb]
  assert {k: v.shape for k, v in posemb_params.items()} == expected
  attention = variables['params']['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_1']
  # 'relative': one bias per head for each of the (2*4-1) x (2*3-1) offsets, and one for pairs with [CLS].
  relative = {'relative_position_bias': (7 * 5 + 1, 4)} if posemb == 'relative' else {}
  assert {k: v.shape for k, v in attention.items() if k.startswith('relative')} == relative


def test_relative_offset_index_numbers_2d_offsets():
  index = models.relative_offset_index((2, 3), num_prefix_tokens=1)
  assert index.shape == (7, 7)
  assert np.all(index[0] == 15) and np.all(index[:, 0] == 15)  # (2*2-1) * (2*3-1) = 15: the [CLS] bucket.
  patches = index[1:, 1:]
  # Pairs with the same 2-D offset share an entry, pairs with different offsets do not.
  positions = [(r, c) for r in range(2) for c in range(3)]
  offsets = {}
  for q, (qr, qc) in enumerate(positions):
    for k, (kr, kc) in enumerate(positions):
      offsets.setdefault((qr - kr, qc - kc), set()).add(int(patches[q, k]))
  assert all(len(ids) == 1 for ids in offsets.values())
  assert len({next(iter(ids)) for ids in offsets.values()}) == len(offsets) == 15
  assert patches[0, 0] == patches[5, 5] == 7  # Offset (0, 0) sits in the middle of the table.


def test_relative_position_bias_acts_on_attention():
  """Zero biases (the initialisation) leave the model patch-permutation invariant like 'none'; learned ones
  make the output depend on where patches are, in the fused and the explicit attention alike."""
  images = jax.random.uniform(jax.random.PRNGKey(1), (1, 16, 16, 3), minval=-1, maxval=1)
  shuffled = images.reshape(1, 4, 4, 4, 4, 3)[:, ::-1].reshape(1, 16, 16, 3)  # Rows of patches reversed.
  model = _tiny(classifier='gap', posemb='relative')
  params = model.init(jax.random.PRNGKey(0), images)['params']
  params['head']['kernel'] = jax.random.normal(jax.random.PRNGKey(3), params['head']['kernel'].shape)
  # One function of the same tokens in another order: the attention's sums reordered.
  limit = tolerances.tolerance(tolerances.model_terms(model, 16, 3))
  tolerances.assert_close(model.apply({'params': params}, shuffled), model.apply({'params': params}, images), limit,
                          'shuffled')
  for i in range(2):
    attention = params['Transformer'][f'encoderblock_{i}']['MultiHeadDotProductAttention_1']
    bias = attention['relative_position_bias']
    attention['relative_position_bias'] = jax.random.normal(jax.random.PRNGKey(4 + i), bias.shape)
  fused = model.apply({'params': params}, images)
  tolerances.assert_differ(model.apply({'params': params}, shuffled), fused, 100 * limit, 'shuffled')
  explicit, _ = model.apply({'params': params}, images, mutable=['intermediates'])
  tolerances.assert_close(fused, explicit, limit, 'explicit attention')


@pytest.mark.slow
def test_resnet_baseline_layout_and_errors():
  model = models.get_model('BiT-R26x1', num_classes=10)
  params = _abstract_params(model, 32, channels=1)
  flat = {'/'.join(k): v.shape for k, v in flax.traverse_util.flatten_dict(params).items()}
  assert flat['conv_root/kernel'] == (7, 7, 1, 64)
  assert flat['block4/unit2/conv3/kernel'] == (1, 1, 512, 2048) and 'block4/unit3/conv1/kernel' not in flat
  assert flat['head/kernel'] == (2048, 10)
  small = models.get_model('BiT-R26x1', num_classes=3, resnet_layers=(1, 1))
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, 28, 28, 1), minval=-1, maxval=1)
  variables = small.init(jax.random.PRNGKey(0), images)
  assert np.all(np.asarray(small.apply(variables, images)) == 0)  # Zero-initialised head.
  assert 'block3' not in variables['params']
  with pytest.raises(ValueError, match=r'BiT-R26x1 is a ResNet.*hidden_size'):
    models.get_model('BiT-R26x1', num_classes=3, hidden_size=64)
  with pytest.raises(ValueError, match='Unknown ResNet depth.*resnet_layers'):
    models.get_model('BiT-R27x1', num_classes=3)


def test_position_embeddings_change_the_output_unless_none():
  images = jax.random.uniform(jax.random.PRNGKey(1), (1, 16, 16, 3), minval=-1, maxval=1)
  # Permuting the patches permutes the tokens; with GAP and no position embedding the output is invariant.
  patches = images.reshape(1, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(1, 16, 4, 4, 3)
  shuffled = patches[:, ::-1].reshape(1, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(1, 16, 16, 3)
  for posemb, invariant in (('none', True), ('sincos_2d', False), ('learn_2d', False)):
    model = _tiny(classifier='gap', posemb=posemb)
    params = model.init(jax.random.PRNGKey(0), images)['params']
    params['head']['kernel'] = jax.random.normal(jax.random.PRNGKey(3), params['head']['kernel'].shape)
    a, b = model.apply({'params': params}, images), model.apply({'params': params}, shuffled)
    # Invariant: the same sums in another order; not: far beyond that.
    limit = tolerances.tolerance(tolerances.model_terms(model, 16, 3))
    assert (tolerances.relative_error(b, a) <= limit if invariant else
            tolerances.relative_error(b, a) > 100 * limit), posemb


@pytest.mark.slow
def test_hybrid_runs_at_small_size():
  model = models.get_model('R50+ViT-Ti/16', num_classes=3, num_layers=1, resnet_layers=(1, 1, 1))
  images = jnp.zeros((2, 64, 64, 3))
  variables = model.init(jax.random.PRNGKey(0), images)
  assert model.apply(variables, images).shape == (2, 3)
  assert variables['params']['Transformer']['posembed_input']['pos_embedding'].shape == (1, 4 * 4 + 1, 192)


def test_conv_stem_feeds_the_patch_embedding_local_features():
  model = models.get_model('ViT-mu/7', num_classes=10, num_layers=1, conv_stem=(8, 16))
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, 28, 28, 1), minval=-1, maxval=1)
  params = model.init(jax.random.PRNGKey(0), images)['params']
  assert params['stem_conv_0']['kernel'].shape == (3, 3, 1, 8)
  assert params['stem_conv_1']['kernel'].shape == (3, 3, 8, 16)
  assert params['embedding']['kernel'].shape == (7, 7, 16, 128)  # Patches of the 16-channel feature map.
  assert model.token_grid((28, 28)) == (4, 4)  # Stride 1: the token grid of the plain ViT.
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 17, 128)
  # A pixel next to a patch border reaches the neighbouring patch's token only through the 3x3 convolutions.
  nudged = images.at[:, 6, 3].add(1.0)
  tokens = lambda x: model.apply({'params': params}, x, capture_intermediates=True)[1]['intermediates'][
      'embedding']['__call__'][0]
  changed = np.abs(np.asarray(tokens(nudged) - tokens(images))).max(axis=(0, 3)) > 0
  assert changed.tolist() == [[True, False, False, False], [True, False, False, False],
                              [False] * 4, [False] * 4]
  corruption = models.PatchCorruption(mask=jnp.zeros((2, 16), bool), replace_with=-jnp.ones((2, 16), int))
  with pytest.raises(ValueError, match='without a stem'):
    model.apply({'params': params}, images, corruption=corruption)
  with pytest.raises(ValueError, match='two different stems'):
    models.get_model('R50+ViT-Ti/16', num_classes=3, conv_stem=(8,)).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  with pytest.raises(ValueError, match=r'ResNet.*conv_stem'):
    models.get_model('BiT-R26x1', num_classes=3, conv_stem=(8,))


def test_attention_weights_are_sown_and_normalised():
  model = _tiny()
  images = jnp.zeros((2, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(0), images)
  _, state = model.apply(variables, images, mutable=['intermediates'])
  weights = state['intermediates']['Transformer']['encoderblock_1']['MultiHeadDotProductAttention_1'][
      'attention_weights'][0]
  assert weights.shape == (2, 4, 5, 5)  # (batch, heads, queries, keys) with 4 patches + [CLS].
  # A softmax over 5 keys sums to one to the round-off of its normalising sum.
  tolerances.assert_close(np.sum(weights, -1), np.ones(weights.shape[:-1]), tolerances.tolerance(5), 'sums')


def test_fused_attention_and_matmul_patch_embedding_compute_the_textbook_function():
  """Without 'intermediates' the model takes the fused attention kernel; with it, the explicit einsums. Both
  agree, and the patch embedding equals a strided convolution with the published (P, P, C, D) kernel."""
  model = models.get_model('ViT-mu/4', 10, num_layers=2, classifier='token')
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3), minval=-1, maxval=1)
  variables = model.init(jax.random.PRNGKey(0), images)
  # Noise on every weight: a non-zero head, without the cancellation a constant shift would make.
  leaves, tree = jax.tree.flatten(variables['params'])
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  fused = model.apply({'params': params}, images)
  explicit, _ = model.apply({'params': params}, images, mutable=['intermediates'])
  tolerances.assert_close(fused, explicit, tolerances.tolerance(tolerances.model_terms(model, 16, 3)), 'logits')
  assert float(jnp.abs(fused).max()) > 0.1
  kernel, bias = params['embedding']['kernel'], params['embedding']['bias']
  conv = jax.lax.conv_general_dilated(images, kernel, (4, 4), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + bias
  embedded = models.PatchEmbedding(128, 4).apply({'params': params['embedding']}, images)
  tolerances.assert_close(embedded, conv, tolerances.tolerance(4 * 4 * 3), 'embedding')  # One sum of P*P*C.


def test_unknown_variant_lists_the_known_ones():
  with pytest.raises(ValueError, match=r'Unknown model variant .*ViT-X/16.*ViT-B/16.*R50\+ViT-B/16'):
    models.get_model('ViT-X/16', num_classes=10)
  with pytest.raises(ValueError, match='Unknown model options'):
    models.get_model('ViT-B/16', num_classes=10, hiden_size=3)


def test_image_size_not_divisible_by_patch_size():
  model = models.get_model('ViT-B/16', num_classes=10)
  with pytest.raises(ValueError, match=r'image size 100x100 is not divisible by the patch size 16.*e.g. 96 or 112'):
    models.count_params(model, image_size=100)


def test_parse_variant_accepts_published_file_names():
  assert models.parse_variant('ViT-B_16') == models.parse_variant('ViT-B/16') == models.parse_variant('B/16')
  assert models.parse_variant('R50+ViT-B_16')['patch_size'] == 1


@pytest.mark.parametrize('remat,scan', [pytest.param(True, False, marks=pytest.mark.slow), (False, True),
                                         pytest.param(True, True, marks=pytest.mark.slow)])
def test_scan_and_remat_match_the_plain_model(remat, scan):
  """Same outputs and gradients; scanned parameters convert to the published layout."""
  kwargs = dict(num_classes=10, patch_size=4, hidden_size=32, mlp_dim=64, num_heads=2, num_layers=3,
                dropout_rate=0.1, classifier='token')
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
  plain = models.VisionTransformer(**kwargs)
  variant = models.VisionTransformer(**kwargs, remat=remat, scan=scan)
  params = plain.init(jax.random.PRNGKey(0), images)['params']
  variant_params = models.stack_layers(params) if scan else params
  # The variant initialises to the same tree structure it is given here.
  assert (jax.tree.structure(variant.init(jax.random.PRNGKey(0), images)['params'])
          == jax.tree.structure(variant_params))
  if scan:
    assert 'encoderblock' in variant_params['Transformer']
    assert variant_params['Transformer']['encoderblock']['MlpBlock_3']['Dense_0']['kernel'].shape == (3, 32, 64)
    roundtrip = models.unstack_layers(variant_params)
    assert jax.tree.structure(roundtrip) == jax.tree.structure(params)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), roundtrip, params)))

  def loss(model, p, train):
    logits = model.apply({'params': p}, images, train=train, rngs={'dropout': jax.random.PRNGKey(2)})
    return jnp.sum(jax.nn.log_softmax(logits)[:, 3])

  # Dropout on only without scan: nn.scan splits the dropout key per layer in its own way. Compiled, as a
  # train step is (op by op, remat's recomputation takes half a minute).
  train = not scan
  tolerances.assert_close(jax.jit(loss, static_argnums=(0, 2))(variant, variant_params, train),
                          jax.jit(loss, static_argnums=(0, 2))(plain, params, train),
                          tolerances.tolerance(tolerances.model_terms(plain, 16, 3)), 'loss')
  grads = jax.jit(jax.grad(lambda p: loss(plain, p, train)))(params)
  variant_grads = jax.jit(jax.grad(lambda p: loss(variant, p, train)))(variant_params)
  if scan:
    variant_grads = models.unstack_layers(variant_grads)
  tolerances.assert_close(variant_grads, grads, tolerances.tolerance(tolerances.gradient_terms(plain, 16, 3, 4)),
                          'gradients')
