"""Few-shot linear evaluation (vit_jax.fewshot) and the small transfer tasks it runs on."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from conftest import run_main
import tolerances
from vit_jax import fewshot
from vit_jax import models


def _clusters(rng, num_classes, per_class, dim, spread):
  centres = rng.normal(size=(num_classes, dim)) * 10
  labels = np.repeat(np.arange(num_classes), per_class)
  return centres[labels] + spread * rng.normal(size=(len(labels), dim)), labels


def test_separable_features_are_classified_perfectly_from_one_shot():
  rng = np.random.default_rng(0)
  train_x, train_y = _clusters(rng, 10, 40, 64, spread=1.0)
  test_x, test_y = _clusters(np.random.default_rng(0), 10, 40, 64, spread=1.0)  # Same centres, new noise below.
  test_x = test_x + rng.normal(size=test_x.shape)
  results = fewshot.few_shot_accuracy(train_x, train_y, test_x, test_y, 10, shots=(1, 5, 25), draws=3)
  for k in (1, 5, 25):
    assert results[k]['mean'] == 1.0 and results[k]['std'] == 0.0, (k, results[k])


def test_features_unrelated_to_the_labels_score_chance():
  rng = np.random.default_rng(1)
  train_x, train_y = rng.normal(size=(1000, 64)), rng.integers(0, 10, 1000)
  test_x, test_y = rng.normal(size=(4000, 64)), rng.integers(0, 10, 4000)
  results = fewshot.few_shot_accuracy(train_x, train_y, test_x, test_y, 10, shots=(1, 10, 25), draws=5)
  for k, result in results.items():
    assert 0.07 < result['mean'] < 0.13, (k, result)  # Chance: 10%; 4,000 test images, 5 draws.
    assert len(result['draws']) == 5


def test_shots_are_seeded_balanced_and_differ_between_draws():
  labels = np.random.default_rng(2).integers(0, 7, 500)
  first = fewshot.choose_shots(labels, 5, seed=3)
  assert np.array_equal(first, fewshot.choose_shots(labels, 5, seed=3))
  assert np.bincount(labels[first], minlength=7).tolist() == [5] * 7
  assert not np.array_equal(first, fewshot.choose_shots(labels, 5, seed=4))
  with pytest.raises(Exception, match='fewer than the 1000 shots.*config.fewshot.pool'):
    fewshot.choose_shots(labels, 1000, seed=0)


def test_regularisation_is_chosen_on_training_examples_never_on_the_test_split():
  rng = np.random.default_rng(4)
  train_x, train_y = _clusters(rng, 5, 60, 32, spread=12.0)  # Overlapping classes: the choice matters.
  test_x, test_y = _clusters(np.random.default_rng(4), 5, 60, 32, spread=12.0)
  results = fewshot.few_shot_accuracy(train_x, train_y, test_x, test_y, 5, shots=(2, 10), draws=4)
  shuffled = fewshot.few_shot_accuracy(train_x, train_y, test_x, rng.permutation(test_y), 5, shots=(2, 10),
                                       draws=4)
  for k in (2, 10):
    assert results[k]['l2_regs'] == shuffled[k]['l2_regs']  # Test labels do not move the choice.
    assert set(results[k]['l2_regs']) <= set(fewshot.L2_REGS)
  # With one candidate there is nothing to choose.
  single = fewshot.few_shot_accuracy(train_x, train_y, test_x, test_y, 5, shots=(2,), draws=2, l2_regs=(0.5,))
  assert single[2]['l2_regs'] == [0.5, 0.5]


def test_least_squares_fit_is_the_closed_form_in_both_shapes():
  """The n x n route (few shots, wide features) and the d x d route give the same classifier."""
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(30, 20)), rng.integers(0, 4, 30)
  tall = fewshot.fit_least_squares(x, y, 4, l2_reg=0.1)  # n >= d
  wide = fewshot.fit_least_squares(np.concatenate([x, np.zeros((30, 20))], 1), y, 4, l2_reg=0.1)  # n < d
  # float64 solves of a system with condition number kappa: kappa times the round-off of its 30 x 20 sums.
  xc = (x - tall.mean) / tall.scale
  gram = xc.T @ xc + 0.1 * np.eye(20)
  limit = np.linalg.cond(gram) * tolerances.tolerance(30 * 20, 'float64')
  tolerances.assert_close(wide.weights[:20], tall.weights, limit, 'weights')
  # The normal equations hold: (X^T X + l2 I) W = X^T (Y - bias).
  targets = 2.0 * np.eye(4)[y] - 1.0 - tall.bias
  tolerances.assert_close(gram @ tall.weights, xc.T @ targets, limit, 'normal equations')


_FEATURES_SCRIPT = r'''
import json, sys
import numpy as np
from vit_jax import host_cpu
host_cpu.setup()
import jax
from vit_jax import fewshot, models, sharding, config_lib
config = config_lib.base_config()
mesh = sharding.make_mesh(config.mesh)
model = models.get_model('ViT-mu/4', num_classes=10, num_layers=2)
images = np.random.default_rng(0).uniform(-1, 1, (100, 16, 16, 3)).astype(np.float32)
params = model.init(jax.random.PRNGKey(0), images[:1])['params']
features = fewshot.FeatureExtractor(model, mesh, batch_size=32)(params, images)
labels = np.arange(100) % 5
result = fewshot.few_shot_accuracy(features[:60], labels[:60], features[60:], labels[60:], 5, shots=(1, 5))
np.save(sys.argv[1], features)
print('RESULT', len(jax.devices()), json.dumps({k: v['draws'] for k, v in result.items()}))
'''


def test_scalar_names_parse_back_to_task_and_shots():
  names = fewshot.scalars({'my_shots_data': {1: {'mean': 0.5, 'std': 0.1}, 25: {'mean': 0.9, 'std': 0.0}}})
  assert names == {'fewshot/my_shots_data/1shot': 0.5, 'fewshot/my_shots_data/1shot_std': 0.1,
                   'fewshot/my_shots_data/25shot': 0.9, 'fewshot/my_shots_data/25shot_std': 0.0}
  assert fewshot.parse_scalar_name('fewshot/my_shots_data/25shot') == ('my_shots_data', 25)


@pytest.mark.slow
def test_eight_devices_give_the_single_device_features_and_accuracies(tmp_path):
  outputs = {}
  for devices in (1, 8):
    env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
    result = subprocess.run([sys.executable, '-c', _FEATURES_SCRIPT, str(tmp_path / f'{devices}.npy')], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [l for l in result.stdout.splitlines() if l.startswith('RESULT')][0].split(' ', 2)
    assert int(line[1]) == devices
    outputs[devices] = (np.load(tmp_path / f'{devices}.npy'), json.loads(line[2]))
  assert outputs[1][0].shape == (100, 128)
  model = models.get_model('ViT-mu/4', num_classes=10, num_layers=2)  # The script's.
  tolerances.assert_close(outputs[8][0], outputs[1][0], tolerances.tolerance(tolerances.model_terms(model, 16, 3)),
                          'features')
  assert outputs[8][1] == outputs[1][1]


def test_mnist_5k_and_held_out_fashion_classes_are_real_tfds_datasets(data_dir):
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from vit_jax.datasets import embedded  # pylint: disable=g-import-not-at-top
  mnist = input_pipeline.get_builder('embedded_mnist', data_dir)
  assert (mnist.info.splits['train'].num_examples, mnist.info.splits['test'].num_examples) == (4000, 1000)
  first = fewshot.load_task('embedded_mnist', data_dir, 28, 1, pool=100, max_test=50)
  assert first.train_images.shape == (100, 28, 28, 1) and first.test_images.shape == (50, 28, 28, 1)
  assert set(first.train_labels) == set(range(10))  # Any prefix holds every class (the file is sorted).
  assert -1.0 <= first.train_images.min() < first.train_images.max() <= 1.0
  colour = fewshot.load_task('embedded_digits', data_dir, 16, 3, pool=10, max_test=10)  # 8x8 grey -> 16x16x3
  assert colour.train_images.shape == (10, 16, 16, 3)
  np.testing.assert_array_equal(colour.train_images[..., 0], colour.train_images[..., 2])

  three = input_pipeline.get_builder('embedded_fashion_mnist_three', data_dir)
  seven = input_pipeline.get_builder('embedded_fashion_mnist_seven', data_dir)
  assert three.info.features['label'].names == ['trouser', 'sneaker', 'bag']
  assert len(seven.info.features['label'].names) == 7
  assert three.info.splits['test'].num_examples + seven.info.splits['test'].num_examples == 10_000
  images, labels = embedded.read_fashion_mnist('test')
  trousers = images[labels == 1]
  task = fewshot.load_task('embedded_fashion_mnist_three', data_dir, 28, 1, pool=3000, max_test=None)
  assert np.bincount(task.test_labels).tolist() == [1000, 1000, 1000]
  # The original's trouser images (tfds stores examples in its own order), in the model's range.
  ours = np.round((task.test_images[task.test_labels == 0] + 1.0) * 127.5).astype(np.uint8)
  assert sorted(image.tobytes() for image in ours) == sorted(image.tobytes() for image in trousers)


@pytest.mark.slow
def test_main_job_logs_few_shot_accuracy_and_the_command_scores_its_workdir(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  run_main(workdir, '--config=configs/digits.py', f'--config.data_dir={data_dir}', '--config.total_steps=60',
           '--config.warmup_steps=10', '--config.eval_every_steps=60',
           '--config.fewshot.tasks=("embedded_mnist",)', '--config.fewshot.shots=(1,5)',
           '--config.fewshot.every_steps=30', '--config.fewshot.max_test=200')
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(workdir), size_guidance={'tensors': 0})
  events.Reload()
  steps = {tag: [e.step for e in events.Tensors(tag)] for tag in events.Tags()['tensors']}
  assert steps['fewshot/embedded_mnist/1shot'] == [30, 60] and steps['fewshot/embedded_mnist/5shot_std'] == [30, 60]
  out = tmp_path / 'fewshot.json'
  # The command on the workdir: its final checkpoint, the recorded settings (3 draws, 200 test images).
  result = subprocess.run([sys.executable, '-m', 'vit_jax.fewshot', f'--workdir={workdir}',
                           '--tasks=embedded_mnist,embedded_fashion_mnist_three', '--shots=1,5',
                           f'--data_dir={data_dir}', f'--out={out}'], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '1-shot' in result.stdout and 'embedded_fashion_mnist_three' in result.stdout
  report = json.loads(out.read_text())
  assert set(report) == {'embedded_mnist', 'embedded_fashion_mnist_three'}
  for by_shots in report.values():
    assert set(by_shots) == {'1', '5'} and all(len(r['draws']) == 3 for r in by_shots.values())
  # Same parameters, same seeded shots: the command reproduces what training logged at its last step.
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  for k in ('1', '5'):
    logged = float(tensor_util.make_ndarray(events.Tensors(f'fewshot/embedded_mnist/{k}shot')[-1].tensor_proto))
    assert logged == pytest.approx(report['embedded_mnist'][k]['mean'], abs=1e-6)
