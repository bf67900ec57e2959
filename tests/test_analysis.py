"""The analysis functions on inputs with known answers, and the figure command on a trained workdir."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from conftest import ROOT, run_main
import tolerances
from vit_jax import analysis
from vit_jax import models


def test_attention_rollout_follows_attention_through_the_residual():
  # 1 [CLS] + 2x2 patches; [CLS] attends only to patch 2 (token 3); others only to themselves.
  attention = np.tile(np.eye(5), (1, 2, 1, 1))
  attention[:, :, 0] = np.eye(5)[3]
  rollout = analysis.attention_rollout([attention], num_prefix_tokens=1, grid=(2, 2))
  np.testing.assert_allclose(rollout[0], [[0, 0], [1, 0]], atol=1e-12)
  uniform = np.full((3, 4, 5, 5), 0.2)
  np.testing.assert_allclose(analysis.attention_rollout([uniform] * 3, 1, (2, 2)), 0.25)
  gap = analysis.attention_rollout([uniform[:, :, 1:, 1:] * 1.25], 0, (2, 2))  # No prefix token: GAP.
  np.testing.assert_allclose(gap, 0.25)


def test_mean_attention_distance_in_pixels():
  identity = np.tile(np.eye(4), (2, 3, 1, 1))
  np.testing.assert_allclose(analysis.mean_attention_distance([identity], (2, 2), 16, 0), 0.0)
  uniform = np.full((2, 3, 5, 5), 0.2)  # With [CLS], ignored: 2x2 patches of 16 px, uniform attention.
  expected = 16 * (0 + 1 + 1 + np.sqrt(2)) / 4
  np.testing.assert_allclose(analysis.mean_attention_distance([uniform, uniform], (2, 2), 16, 1),
                             np.full((2, 3), expected))


def test_position_embedding_similarity_and_filter_components():
  table = np.concatenate([np.zeros((1, 64)), models.sincos_2d((6, 6), 64)])[None]
  similarity = analysis.position_embedding_similarity(table, (6, 6), num_prefix_tokens=1)
  assert similarity.shape == (6, 6, 6, 6)
  np.testing.assert_allclose([similarity[i, j, i, j] for i in range(6) for j in range(6)], 1.0)
  assert similarity[2, 2, 2, 3] > similarity[2, 2, 2, 5] and similarity[2, 2, 3, 2] > similarity[2, 2, 5, 2]
  rng = np.random.default_rng(0)
  basis = np.linalg.qr(rng.normal(size=(4 * 4 * 3, 2)))[0].T  # Two orthonormal filters.
  kernel = (rng.normal(size=(200, 2)) * [3.0, 1.0]) @ basis  # 200 filters in their span.
  components, variance = analysis.embedding_filter_components(kernel.T.reshape(4, 4, 3, 200), 5)
  assert components.shape == (5, 4, 4, 3) and variance[0] > variance[1] > 0.05
  assert np.sum(variance[:2]) > 1 - 1e-9  # Two directions explain everything.
  np.testing.assert_allclose(np.abs(components[:2].reshape(2, -1) @ basis.T), np.eye(2), atol=0.05)


def test_filter_figure_shows_the_first_layer_that_sees_pixels(tmp_path):
  from vit_jax import analyze  # pylint: disable=g-import-not-at-top
  images = jnp.zeros((1, 28, 28, 1))
  for overrides, layer, shape in (({}, 'embedding', (7, 7, 1, 128)),
                                  ({'conv_stem': (8,)}, 'stem_conv_0', (3, 3, 1, 8))):
    model = models.get_model('ViT-mu/7', 10, num_layers=1, **overrides)
    params = model.init(jax.random.PRNGKey(0), images)['params']
    name, kernel = analyze.pixel_filters(params)
    assert (name, kernel.shape) == (layer, shape)
    components, variance = analysis.embedding_filter_components(np.asarray(kernel), 28)
    path = str(tmp_path / f'{layer}.png')
    analyze.draw_embedding_filters(components, variance, path, layer)
    assert matplotlib.image.imread(path).std() > 0.01


def test_attention_weights_of_scanned_and_unrolled_models_agree():
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3), minval=-1, maxval=1)
  plain = models.get_model('ViT-mu/4', 10, num_layers=3)
  params = plain.init(jax.random.PRNGKey(1), images)['params']
  scanned = models.get_model('ViT-mu/4', 10, num_layers=3, scan=True)
  weights = analysis.attention_weights(plain, params, images)
  weights_scanned = analysis.attention_weights(scanned, models.stack_layers(params), images)
  assert len(weights) == 3 and weights[0].shape == (2, 4, 17, 17)
  tolerances.assert_close(weights_scanned, weights, tolerances.tolerance(tolerances.model_terms(plain, 16, 3)),
                          'attention weights')


@pytest.mark.slow
def test_analyze_command_writes_the_figures_of_a_trained_run(tmp_path, data_dir):
  workdir, out = tmp_path / 'run', tmp_path / 'figures'
  run_main(workdir, '--config=configs/digits.py', '--config.model.num_layers=2', f'--config.data_dir={data_dir}',
           '--config.total_steps=30', '--config.warmup_steps=10', '--config.model.classifier=token')
  result = subprocess.run([sys.executable, '-m', 'vit_jax.analyze', f'--workdir={workdir}', f'--out={out}',
                           '--num_images=16'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ('attention_maps', 'position_embedding_similarity', 'mean_attention_distance',
               'embedding_filters'):
    image = matplotlib.image.imread(os.path.join(out, f'{name}.png'))
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0.01  # A real, non-blank picture.
  summary = json.loads((out / 'analysis.json').read_text())
  assert summary['step'] == 30 and summary['grid'] == [4, 4] and summary['num_images'] == 16
  distance = np.asarray(summary['mean_attention_distance_px'])
  assert distance.shape == (2, 4) and np.all(distance > 0) and np.all(distance < 8 * np.sqrt(2))

  # An --out that cannot be written (under a file: refused to root too) ends in one line naming it.
  blocked = subprocess.run([sys.executable, '-m', 'vit_jax.analyze', f'--workdir={workdir}',
                            f'--out={out}/analysis.json/figures', '--num_images=16'], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
  assert blocked.returncode == 2 and 'Traceback' not in blocked.stderr, blocked.stderr[-3000:]
  assert f'Error: Cannot use {out}/analysis.json' in blocked.stderr and 'Not a directory' in blocked.stderr
