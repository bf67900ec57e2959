"""Published-layout `.npz` import/export, position-embedding resizing, and loading pretrained weights into a
model built for a new task."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, run_main
import tolerances
from vit_jax import checkpoints
from vit_jax import models


def _init(model, image_size, channels=3):
  return model.init(jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, channels)))['params']


def test_npz_round_trip_is_bit_exact_and_uses_the_published_keys(tmp_path):
  model = models.get_model('ViT-mu/4', 10, classifier='token', representation_size=32, num_layers=2)
  params = _init(model, 16)
  path = str(tmp_path / 'model.npz')
  checkpoints.save_npz(params, path)
  with np.load(path) as data:
    keys = set(data.files)
  assert {'cls', 'embedding/kernel', 'Transformer/posembed_input/pos_embedding', 'pre_logits/kernel',
          'head/bias', 'Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel'} <= keys
  loaded = checkpoints.load_npz(path)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  assert not [p for p in os.listdir(tmp_path) if p.endswith('.tmp')]  # The temporary file was renamed.


def test_scanned_parameters_export_in_the_per_layer_layout(tmp_path):
  scanned = models.get_model('ViT-mu/4', 10, num_layers=3, scan=True)
  params = _init(scanned, 16)
  checkpoints.save_npz(params, str(tmp_path / 'scanned.npz'))
  loaded = checkpoints.load_npz(str(tmp_path / 'scanned.npz'))
  assert sorted(k for k in loaded['Transformer'] if k.startswith('encoderblock')) == [
      'encoderblock_0', 'encoderblock_1', 'encoderblock_2']
  plain = models.get_model('ViT-mu/4', 10, num_layers=3)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  tolerances.assert_close(plain.apply({'params': loaded}, images), scanned.apply({'params': params}, images),
                          tolerances.tolerance(tolerances.model_terms(plain, 16, 3)), 'logits')


def test_resize_posemb_interpolates_the_grid_and_keeps_cls_apart():
  dim = 4
  rows = np.arange(14, dtype=np.float32)[:, None, None] * np.ones((14, 14, dim), np.float32)  # Varies with y.
  posemb = np.concatenate([np.full((1, 1, dim), 7.0, np.float32), rows.reshape(1, 196, dim)], axis=1)
  resized = checkpoints.resize_posemb(posemb, (24, 24), num_prefix_tokens=1)
  assert resized.shape == (1, 1 + 24 * 24, dim)
  assert np.array_equal(resized[0, 0], posemb[0, 0])  # [CLS] untouched.
  grid = resized[0, 1:].reshape(24, 24, dim)
  # Constant along x (bilinear interpolation: each value a sum of 4 weighted neighbours)...
  tolerances.assert_close(grid, np.broadcast_to(grid[:, :1], grid.shape), tolerances.tolerance(4), 'rows')
  assert np.all(np.diff(grid[:, 0, 0]) >= 0) and grid[0, 0, 0] < 0.5 and grid[-1, 0, 0] > 12.5  # ...rising in y.
  assert checkpoints.resize_posemb(posemb, (14, 21), 1).shape == (1, 1 + 14 * 21, dim)  # Non-square.
  assert checkpoints.resize_posemb(posemb[:, 1:], (7, 7), 0).shape == (1, 49, dim)  # GAP models: no prefix.


def test_relative_position_biases_are_resized_for_a_larger_grid():
  """A 'relative' model trained on a 4x4 grid fine-tunes on 6x6: the table of 2-D offsets is interpolated,
  the [CLS] bias kept, and offset (0, 0) stays in the middle."""
  small = models.get_model('ViT-mu/4', 10, num_layers=1, posemb='relative')
  large = models.get_model('ViT-mu/4', 3, num_layers=1, posemb='relative')
  params = _init(small, 16)
  attention = params['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_1']
  dy, dx = np.mgrid[-3:4, -3:4]
  table = np.concatenate([np.stack([dy.ravel(), dx.ravel(), -dy.ravel(), np.hypot(dy, dx).ravel()], -1),
                          np.full((1, 4), 9.0)]).astype(np.float32)  # (7*7 + 1, 4 heads): bias = offset.
  attention['relative_position_bias'] = table
  adapted = checkpoints.adapt_to_model(params, _init(large, 24), large.token_grid((24, 24)), 1)
  resized = adapted['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_1']['relative_position_bias']
  assert resized.shape == (11 * 11 + 1, 4)
  assert np.array_equal(resized[-1], table[-1])
  grid = resized[:-1].reshape(11, 11, 4)
  # Offset (0, 0) in the middle: zero, to the round-off of a bilinear interpolation (4 terms) of the table.
  tolerances.assert_close(grid[5, 5], np.zeros(4), tolerances.tolerance(4) * np.abs(table).max(), 'centre')
  assert np.all(np.diff(grid[:, 5, 0]) > 0) and np.all(np.diff(grid[5, :, 1]) > 0)  # Still rising in y, x.
  with pytest.raises(checkpoints.CheckpointError, match='relative position biases'):
    checkpoints.resize_relative_bias(table[:-2], (6, 6))


# The hybrid's ResNet stem takes most of the time: the full suite's.
@pytest.mark.parametrize('name', [pytest.param(name, marks=pytest.mark.slow) if name.startswith('R50') else name
                                  for name in models.PAPER_VARIANTS])
def test_every_variant_loads_for_fine_tuning_at_higher_resolution(name, tmp_path):
  """One layer of each variant (per-layer shapes as published): export at 224px with 1000 classes, load into
  the 384px model (392px for patch 14) with 10 classes: new zero head, 2-D resized position embeddings, the
  rest identical."""
  pretrained_model = models.get_model(name, 1000, num_layers=1, representation_size=None)
  path = str(tmp_path / 'pretrained.npz')
  checkpoints.save_npz(_init(pretrained_model, 224), path)
  pretrained = checkpoints.load_npz(path)
  model = models.get_model(name, 10, num_layers=1)
  size = 384 if 384 % model.patch_size == 0 else 392
  fresh = jax.eval_shape(lambda: _init(model, size))
  fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), fresh)
  patch = model.patch_size * (16 if model.resnet_layers else 1)
  grid = (size // patch,) * 2
  params = checkpoints.adapt_to_model(pretrained, fresh, grid, num_prefix_tokens=1)
  assert params['head']['kernel'].shape[-1] == 10 and not np.any(params['head']['kernel'])
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 1 + grid[0] * grid[1],
                                                                            model.hidden_size)
  block = 'encoderblock_0'
  assert np.array_equal(params['Transformer'][block]['MlpBlock_3']['Dense_0']['kernel'],
                        pretrained['Transformer'][block]['MlpBlock_3']['Dense_0']['kernel'])


def test_mismatches_and_broken_files_get_clear_errors(tmp_path):
  small = _init(models.get_model('ViT-mu/4', 10, num_layers=2), 16)
  other = jax.tree.map(np.asarray, _init(models.get_model('ViT-mu/4', 10, num_layers=2, hidden_size=64,
                                                          mlp_dim=128), 16))
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'encoderblock_0/MlpBlock_3/Dense_0/kernel: checkpoint \(128, 256\) vs model \(64, 128\)'):
    checkpoints.adapt_to_model(jax.tree.map(np.asarray, small), other, (4, 4), 1)
  deeper = _init(models.get_model('ViT-mu/4', 10, num_layers=3), 16)
  with pytest.raises(checkpoints.CheckpointError, match='encoderblock_2/.*in the checkpoint, not in the model'):
    checkpoints.adapt_to_model(jax.tree.map(np.asarray, deeper), jax.tree.map(np.asarray, small), (4, 4), 1)

  path = str(tmp_path / 'model.npz')
  checkpoints.save_npz(small, path)
  data = open(path, 'rb').read()
  truncated = tmp_path / 'truncated.npz'
  truncated.write_bytes(data[:len(data) // 2])
  with pytest.raises(checkpoints.CheckpointError, match='corrupt or truncated'):
    checkpoints.load_npz(str(truncated))
  corrupt = bytearray(data)
  corrupt[len(data) // 2:len(data) // 2 + 64] = bytes(64)  # Zeroed bytes inside an array: CRC fails.
  (tmp_path / 'corrupt.npz').write_bytes(bytes(corrupt))
  with pytest.raises(checkpoints.CheckpointError, match='corrupt or truncated'):
    checkpoints.load_npz(str(tmp_path / 'corrupt.npz'))
  with pytest.raises(checkpoints.CheckpointError, match='does not exist'):
    checkpoints.load_npz(str(tmp_path / 'missing.npz'))
  # `init_from` a folder that is not a workdir: named as such, not as a damaged file.
  (tmp_path / 'not_a_workdir').mkdir()
  with pytest.raises(checkpoints.CheckpointError, match='is a folder, not a .npz file, and not a vit_jax workdir'):
    checkpoints.load_pretrained(str(tmp_path / 'not_a_workdir'))


@pytest.mark.slow
def test_export_command_writes_the_trained_parameters(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  run_main(workdir, '--config=configs/digits.py', '--config.model.num_layers=1', f'--config.data_dir={data_dir}',
           '--config.total_steps=10', '--config.warmup_steps=2', '--config.model.scan=true')
  out = tmp_path / 'exported.npz'
  result = subprocess.run([sys.executable, '-m', 'vit_jax.export', f'--workdir={workdir}', f'--out={out}'],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'of step 10 in the published layout' in result.stdout
  params, step = checkpoints.restore_params(str(workdir))
  assert step == 10
  exported = checkpoints.load_npz(str(out))
  assert 'encoderblock_0' in exported['Transformer']  # Scanned in training, per-layer on disk.
  for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(models.unstack_layers(params))):
    assert np.array_equal(a, b)
  assert np.any(exported['head']['kernel'])  # Trained: the zero-initialised head moved.
  export = lambda *flags: subprocess.run([sys.executable, '-m', 'vit_jax.export', *flags], cwd=ROOT,
                                         capture_output=True, text=True, timeout=300)
  missing = export(f'--workdir={tmp_path}/nothing', f'--out={tmp_path}/other.npz')
  assert missing.returncode != 0 and 'No checkpoints in' in missing.stderr
  # An existing file is replaced only when asked; a folder or an unwritable place is named, in one line.
  out.write_bytes(b'keep me')
  kept = export(f'--workdir={workdir}', f'--out={out}')
  assert kept.returncode == 2 and f'Error: {out} exists: pass --overwrite' in kept.stderr, kept.stderr[-2000:]
  assert out.read_bytes() == b'keep me'
  assert export(f'--workdir={workdir}', f'--out={out}', '--overwrite').returncode == 0
  assert checkpoints.load_npz(str(out))['head']['kernel'].shape == exported['head']['kernel'].shape
  folder = export(f'--workdir={workdir}', f'--out={tmp_path}')
  assert folder.returncode == 2 and 'is a folder: give the path of the file' in folder.stderr
  # Under a file, no one can write (root included, as CI runs).
  unwritable = export(f'--workdir={workdir}', f'--out={out}/model.npz')
  assert unwritable.returncode == 2 and f'Error: Cannot write {out}/model.npz' in unwritable.stderr, (
      unwritable.stderr[-2000:])


@pytest.mark.slow
def test_fine_tuning_at_higher_resolution_from_a_workdir_and_from_an_npz(tmp_path, data_dir):
  """Pretrain on 8x8 digits, fine-tune at 16x16 (4x4 -> 8x8 patch grid) with the SGD recipe, from the
  workdir and from its exported .npz: both start from the same weights and end in the same place."""
  common = ('--config=configs/digits.py', '--config.model.num_layers=1', f'--config.data_dir={data_dir}',
            '--config.model.classifier=token')
  pretrain = tmp_path / 'pretrain'
  run_main(pretrain, *common, '--config.total_steps=60', '--config.warmup_steps=59')
  npz = tmp_path / 'pretrained.npz'
  subprocess.run([sys.executable, '-m', 'vit_jax.export', f'--workdir={pretrain}', f'--out={npz}'], cwd=ROOT,
                 check=True, capture_output=True, timeout=300)
  finetune = (*common, '--config.image_size=16', '--config.optimizer=sgd', '--config.weight_decay=0',
              '--config.lr=0.01', '--config.total_steps=20', '--config.warmup_steps=5')
  outputs = []
  for name, source in (('from_workdir', pretrain), ('from_npz', npz)):
    result = run_main(tmp_path / name, *finetune, f'--config.init_from={source}')
    assert 'position embeddings for a 8x8 grid' in result.stderr
    outputs.append(result.stdout.split('Final test accuracy: ')[1].split()[0])
  assert outputs[0] == outputs[1]
  assert float(outputs[0]) > 0.3  # Pretrained features carry over (chance: 0.1) after 20 steps.
  # A model of another width cannot take these weights: a clear error, no training.
  bad = run_main(tmp_path / 'bad', *finetune, f'--config.init_from={npz}', '--config.model.hidden_size=64',
                 '--config.model.mlp_dim=128', check=False)
  assert bad.returncode != 0 and 'does not fit the model' in bad.stderr and 'step 1' not in bad.stderr
  required = run_main(tmp_path / 'required', '--config=configs/vit_b16_finetune.py', check=False)
  assert required.returncode != 0 and 'set --config.init_from' in required.stderr


def test_checksums_are_those_of_checkpoints_written_before_their_compile_options_changed():
  # Checkpoints already written carry checksums computed by the fingerprint compiled at XLA's default level:
  # the lighter compile must give the same integers, or every restore of them would fail its check.
  rng = np.random.default_rng(0)
  arrays = {'f32': rng.normal(size=(3, 5, 7)).astype(np.float32), 'scalar': np.float32(2.5),
            'bf16': jnp.asarray(rng.normal(size=(64,)), jnp.bfloat16), 'i32': rng.integers(-9, 9, (4, 4), np.int32),
            'u8': rng.integers(0, 255, (2, 28, 28, 1), np.uint8), 'bool': rng.random(10) > 0.5}
  default = jax.jit(checkpoints._fingerprint)  # pylint: disable=protected-access
  expected = {name: [int(v) for v in np.asarray(default(jnp.asarray(x)))] for name, x in arrays.items()}
  assert checkpoints.array_checksums({k: jnp.asarray(v) for k, v in arrays.items()}) == expected
