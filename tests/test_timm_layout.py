"""Our weights in timm: the exported state_dict, loaded into timm's VisionTransformer (or ResNetV2), gives our
logits, for every kind of model the project trains.

torch and timm come with the `torch` extra. Without them these tests skip, unless VIT_JAX_REQUIRE_TORCH=1
(set by CI, which installs the extra), where a missing install fails instead of hiding.
"""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, run_main
import tolerances
from vit_jax import checkpoints
from vit_jax import config_lib
from vit_jax import models

if os.environ.get('VIT_JAX_REQUIRE_TORCH') == '1':
  import timm  # pylint: disable=unused-import
  import torch
else:
  torch = pytest.importorskip('torch')
  timm = pytest.importorskip('timm')

from vit_jax import timm_layout  # pylint: disable=g-import-not-at-top


def _timm_logits(timm_model, images: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return timm_model(torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)).numpy()  # NHWC -> NCHW


@pytest.mark.parametrize('name,overrides,image_size', [
    ('ViT-mu/4', dict(classifier='token', posemb='learn_1d'), 32),
    ('ViT-mu/4', dict(classifier='gap', posemb='sincos_2d'), 32),
    ('ViT-mu/4', dict(classifier='token', posemb='learn_2d'), 24),
    ('ViT-mu/4', dict(classifier='gap', posemb='none'), 16),
    pytest.param('R50+ViT-B/16', dict(hidden_size=64, mlp_dim=128, num_heads=4, resnet_layers=(1, 2, 1)), 64,
                 marks=pytest.mark.slow),  # The ResNet stem compiles slowly: the full suite's.
    # The default's shape: a 3x3 convolutional stem before 7x7 patches, [CLS].
    ('ViT-mu/7', dict(classifier='token', conv_stem=(32,)), 28),
    ('ViT-mu/4', dict(classifier='gap', conv_stem=(8, 16), posemb='sincos_2d'), 16),
    # The ImageNet pretraining configs' pre-logits layer.
    ('ViT-mu/4', dict(classifier='token', representation_size=48), 16),
    # The paper's CNN baseline (configs/ablations.py, data_scale).
    ('BiT-R26x1', dict(resnet_layers=(1, 1)), 32),
])
def test_timm_model_with_our_weights_gives_our_logits(name, overrides, image_size):
  if not name.startswith('BiT-'):
    overrides = dict(num_layers=2, **overrides)
  model = models.get_model(name, 7, **overrides)
  images = jax.random.uniform(jax.random.PRNGKey(1), (3, image_size, image_size, 3), minval=-1, maxval=1)
  params = model.init(jax.random.PRNGKey(0), images)['params']
  # Perturb every weight (the head starts at zero, GroupNorm scales at zero) so all of them matter.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  ours = np.asarray(model.apply({'params': params}, images))
  table = models.position_embedding_table(model, params, image_size) if 'Transformer' in params else None
  theirs = _timm_logits(timm_layout.create_model(params, image_size, table), images)
  assert np.abs(ours).max() > 0.1
  # PyTorch's kernels sum in their own order.
  tolerances.assert_close(theirs, ours, tolerances.tolerance(tolerances.model_terms(model, image_size, 3)),
                          'logits')
  assert not np.allclose(theirs[0], theirs[1])  # Different images, different logits.


def test_state_dict_uses_timm_key_names_and_names_what_timm_cannot_express():
  model = models.get_model('ViT-mu/4', 10, num_layers=1)
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))['params']
  weights = timm_layout.state_dict(params)
  expected = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=10, depth=1,
                               embed_dim=128, num_heads=4, mlp_ratio=2.0, img_size=16, patch_size=4)
  assert {k: tuple(v.shape) for k, v in weights.items()} == {
      k: tuple(v.shape) for k, v in expected.state_dict().items()}
  relative = models.get_model('ViT-mu/4', 10, num_layers=1, posemb='relative')
  params = relative.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))['params']
  with pytest.raises(ValueError, match='relative position biases'):
    timm_layout.state_dict(params)
  corruption = models.PatchCorruption(mask=np.zeros((1, 16), bool), replace_with=np.full((1, 16), -1))
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32), corruption=corruption)
  with pytest.raises(ValueError, match='masked-patch-prediction model'):
    timm_layout.state_dict(params['params'])


@pytest.mark.slow
def test_export_torch_command_writes_a_state_dict_timm_loads(tmp_path, data_dir):
  """A trained workdir (with a moving average; the default's kind of model: [CLS], a convolutional stem) ->
  `--format torch` -> timm gives our model's logits."""
  workdir = tmp_path / 'run'
  run_main(workdir, '--config=configs/digits.py', '--config.model.num_layers=1', f'--config.data_dir={data_dir}',
           '--config.total_steps=20', '--config.warmup_steps=5', '--config.ema_decay=0.9',
           '--config.model.classifier=token',
           '--config.model.conv_stem=(8,)')
  exported = {}
  for which in ('auto', 'raw'):
    out = tmp_path / f'{which}.pth'
    result = subprocess.run([sys.executable, '-m', 'vit_jax.export', f'--workdir={workdir}', f'--out={out}',
                             '--format=torch', f'--params={which}'],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'as a timm state_dict' in result.stdout and 'the convolutional stem' in result.stdout
    exported[which] = torch.load(out)
  params, _ = checkpoints.restore_params(str(workdir))  # The moving average: the run kept one.
  config = config_lib.load_workdir_config(str(workdir))
  model = models.from_config(config, num_classes=10)
  images = np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
  ours = np.asarray(model.apply({'params': params}, images))
  timm_model = timm_layout.create_model(params, config.image_size)
  timm_model.load_state_dict(exported['auto'])  # The file, not the in-memory conversion.
  tolerances.assert_close(_timm_logits(timm_model, images), ours,
                          tolerances.tolerance(tolerances.model_terms(model, config.image_size, 1)), 'logits')
  raw, _ = checkpoints.restore_params(str(workdir), ema=False)
  assert np.array_equal(exported['raw']['head.weight'].numpy(), raw['head']['kernel'].T)
  assert not np.array_equal(exported['raw']['head.weight'].numpy(), exported['auto']['head.weight'].numpy())
