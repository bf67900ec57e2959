"""Masked patch prediction (paper Sec. 4.6): corruption, mean-colour targets, the loss, pretrain -> fine-tune."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, run_main
import tolerances
from vit_jax import config_lib
from vit_jax import masked_patches
from vit_jax import models
from vit_jax import sharding
from vit_jax import train


def test_corruption_selects_half_and_splits_80_10_10():
  config = load_config('default.py').masked_patches
  corruption, selected = masked_patches.sample_corruption(jax.random.PRNGKey(0), batch=512, num_patches=16,
                                                         config=config)
  selected, mask, replace = map(np.asarray, (selected, corruption.mask, corruption.replace_with))
  assert np.all(selected.sum(1) == 8)  # Exactly half of each image's patches.
  assert not np.any(mask & ~selected) and not np.any((replace >= 0) & ~selected)
  assert not np.any(mask & (replace >= 0))
  kept = selected & ~mask & (replace < 0)
  fractions = [x.sum() / selected.sum() for x in (mask, replace >= 0, kept)]
  np.testing.assert_allclose(fractions, [0.8, 0.1, 0.1], atol=0.02)
  assert replace.max() < 512 * 16


def test_mean_colour_classes():
  images = np.full((1, 4, 4, 3), -1.0, np.float32)  # Black, except:
  images[0, :2, 2:] = 1.0  # patch (0, 1) white: 7 + 7*8 + 7*64 = 511,
  images[0, 2:, :2, 0] = 0.0  # patch (1, 0) half red: level 4 of 8 -> 4,
  images[0, 2:, 2:, 2] = np.array([[-1, 1], [1, 1]])  # patch (1, 1) mean blue 0.75 -> level 6 -> 6 * 64.
  assert masked_patches.mean_colour_classes(jnp.asarray(images), 2).tolist() == [[0, 511, 4, 384]]
  # 4 patches of 2x2, means -0.857, -0.286, 0.286, 0.857 -> (mean + 1) / 2 * 8 = 0.57, 2.86, 5.14, 7.43.
  grey = np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 1, 8, 1).repeat(2, 1)
  assert masked_patches.mean_colour_classes(jnp.asarray(grey), 2).tolist() == [[0, 2, 5, 7]]


def test_masked_patches_replace_the_input():
  """Every patch masked: the encoder sees no image content, so all images get the same predictions; no
  patch masked: predictions follow the images. Grey images: 8 colour classes per patch."""
  model = models.get_model('ViT-mu/4', num_classes=10, num_layers=2)
  images = jax.random.uniform(jax.random.PRNGKey(1), (3, 16, 16, 1), minval=-1, maxval=1)
  none = models.PatchCorruption(mask=jnp.zeros((3, 16), bool), replace_with=jnp.full((3, 16), -1))
  params = model.init(jax.random.PRNGKey(0), images, corruption=none)['params']
  assert params['mask_token'].shape == (1, 1, 128) and params['mpp_head']['kernel'].shape == (128, 8)
  clean = model.apply({'params': params}, images, corruption=none)
  assert clean.shape == (3, 16, 8) and tolerances.relative_error(clean[0], clean[1]) > 1e-2
  masked = model.apply({'params': params}, images, corruption=models.PatchCorruption(
      mask=jnp.ones((3, 16), bool), replace_with=jnp.full((3, 16), -1)))
  limit = tolerances.tolerance(tolerances.model_terms(model, 16, 1))  # Same inputs, another batch row.
  tolerances.assert_close(masked[0], masked[1], limit, 'masked')
  # Replacing every patch of image 0 by those of image 1 makes their predictions equal.
  swap = jnp.full((3, 16), -1).at[0].set(jnp.arange(16, 32))
  swapped = model.apply({'params': params}, images, corruption=models.PatchCorruption(
      mask=jnp.zeros((3, 16), bool), replace_with=swap))
  tolerances.assert_close(swapped[0], clean[1], limit, 'swapped')


def test_masked_patch_training_lowers_the_loss_and_ignores_labels():
  config = load_config('digits.py')
  config.model.num_layers = 2
  config.update(dict(objective='masked_patches', lr=3e-3, warmup_steps=0))
  mesh = sharding.make_mesh(config.mesh)
  run = train.setup(config, mesh, num_classes=10, num_steps=100, channels=1)
  state = run.init_state(jax.random.PRNGKey(0))
  assert 'mpp_head' in state.params and 'head' not in state.params
  rng = np.random.default_rng(0)
  # Smooth images, so a patch's colour is predictable from its neighbours.
  images = np.cumsum(rng.uniform(-0.3, 0.3, (64, 8, 8, 1)), axis=1).clip(-1, 1).astype(np.float32)
  batch = {'image': images, 'label': rng.integers(0, 10, 64).astype(np.int32)}
  losses = []
  for _ in range(15):
    state, metrics = run.train_fn(state, sharding.to_global_batch(batch, mesh))
    losses.append(float(metrics['loss']))
  assert losses[0] > losses[-1] + 0.3
  relabelled = sharding.to_global_batch({**batch, 'label': (batch['label'] + 1) % 10, 'mask': np.ones(64)}, mesh)
  same = sharding.to_global_batch({**batch, 'mask': np.ones(64)}, mesh)
  a, b = run.eval_fn(state.params, same), run.eval_fn(state.params, relabelled)
  assert float(a['count']) == 64 * 8  # Half of the 16 patches of each image.
  assert float(a['loss']) == float(b['loss'])
  unknown = config.copy_and_resolve_references()
  unknown.objective = 'mae'
  with pytest.raises(ValueError, match="Unknown objective 'mae'"):
    config_lib.validate(unknown)


@pytest.mark.slow
def test_pretrain_by_masked_patches_then_fine_tune(tmp_path, data_dir):
  """The main job pretrains on images alone, then fine-tunes from that workdir ([mask] and colour head
  dropped, a zero classification head added)."""
  common = ['--config=configs/digits.py', f'--config.data_dir={data_dir}', '--config.model.num_layers=2',
            '--config.log_every_steps=20', '--config.eval_every_steps=1000', '--config.warmup_steps=20']
  pretrain = run_main(tmp_path / 'mpp', *common, '--config.objective=masked_patches', '--config.total_steps=60')
  assert re.search(r'masked-patch colour accuracy: \d\.\d+', pretrain.stdout), pretrain.stdout
  finetune = run_main(tmp_path / 'ft', *common, f'--config.init_from={tmp_path / "mpp"}',
                      '--config.total_steps=60')
  assert 'Initialised from' in finetune.stderr
  accuracy = float(re.search(r'Final test accuracy: (\d\.\d+)', finetune.stdout)[1])
  assert accuracy > 0.3  # Ten classes: chance is 0.1.
  failed = run_main(tmp_path / 'bad', *common, '--config.objective=masked_patches',
                    f'--config.init_from={tmp_path / "mpp"}', check=False)
  assert failed.returncode != 0 and 'pretrains from scratch' in failed.stderr
