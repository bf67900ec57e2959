"""Few-shot linear evaluation of a frozen ViT, as the paper scores its ablations (Sec. 4.1, Table 8, Fig. 3).

For each task: the representation the head reads (`models.VisionTransformer(pre_logits=True)`: the [CLS] token
or the token mean after the final norm, through `pre_logits` when the model has one) of k training examples
per class; a closed-form L2-regularised least-squares fit of those features to {-1, 1} one-vs-rest targets;
the accuracy of its arg-max on the task's test split. The k shots of each class are drawn from the task's first
`pool` training examples by a seeded generator; `draws` draws are averaged and their spread reported. The
regularisation strength is chosen per draw from `l2_regs` by accuracy on the pool's other examples (training
data, never the test split).

  python -m vit_jax.fewshot --workdir /tmp/vit_default                 # the tasks of its config.fewshot
  python -m vit_jax.fewshot --workdir /tmp/vit_default --tasks=embedded_mnist,embedded_digits --shots=1,10
  python -m vit_jax.fewshot --npz model.npz --config configs/default.py --tasks=embedded_mnist

During training, `config.fewshot.tasks` are evaluated every `config.fewshot.every_steps` steps and at the end:
`fewshot/<task>/<k>shot` in TensorBoard and the progress log.
"""
import dataclasses
import json
from typing import Dict, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from vit_jax import errors
from vit_jax import host_cpu
from vit_jax import models
from vit_jax import sharding


@dataclasses.dataclass(frozen=True)
class LinearClassifier:
  """Centred, scaled features -> one score per class."""
  mean: np.ndarray
  scale: float
  weights: np.ndarray  # (features, classes)
  bias: np.ndarray  # (classes,)

  def predict(self, features: np.ndarray) -> np.ndarray:
    scores = (features.astype(np.float64) - self.mean) / self.scale @ self.weights + self.bias
    return np.argmax(scores, axis=-1)


def fit_least_squares(features: np.ndarray, labels: np.ndarray, num_classes: int,
                      l2_reg: float) -> LinearClassifier:
  """argmin_W |X W - Y|^2 + l2_reg |W|^2 for Y in {-1, 1}: X centred, and scaled so that its rows' mean squared
  norm is 1 (l2_reg then means the same for any feature width or scale); an unregularised bias."""
  x = features.astype(np.float64)
  mean = x.mean(axis=0)
  x = x - mean
  scale = float(np.sqrt(np.mean(np.sum(x * x, axis=1)))) or 1.0
  x /= scale
  targets = 2.0 * np.eye(num_classes)[labels] - 1.0
  bias = targets.mean(axis=0)
  targets -= bias
  n, d = x.shape
  if n < d:  # The same solution through the n x n system: few shots, wide features.
    weights = x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), targets)
  else:
    weights = np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ targets)
  return LinearClassifier(mean=mean, scale=scale, weights=weights, bias=bias)


def choose_shots(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
  """Indices of `shots` examples of every class present in `labels`, drawn by a generator seeded with `seed`."""
  rng = np.random.default_rng(seed)
  chosen = []
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    if len(members) < shots:
      raise errors.DataError(f'Class {label} has {len(members)} examples in the few-shot pool, fewer than the '
                             f'{shots} shots asked: enlarge config.fewshot.pool or ask for fewer shots.')
    chosen.append(rng.choice(members, shots, replace=False))
  return np.sort(np.concatenate(chosen))


L2_REGS = (1e-3, 1e-2, 0.1, 1.0, 10.0)


def few_shot_accuracy(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                      test_labels: np.ndarray, num_classes: int, shots: Sequence[int], draws: int = 3,
                      seed: int = 0, l2_regs: Sequence[float] = L2_REGS) -> Dict[int, dict]:
  """{k: {'mean', 'std', 'draws', 'l2_regs'}}: test accuracy of the least-squares fit to k examples per class,
  over `draws` seeded draws (the same draws for any model given the same labels and seed). Each draw's
  regularisation is the one of `l2_regs` that scores best on the training examples not drawn (the first of
  equals; the middle one when every example was drawn)."""
  results = {}
  for k in shots:
    accuracies, chosen_regs = [], []
    for draw in range(draws):
      chosen = choose_shots(train_labels, k, seed=seed * 1_000 + 97 * k + draw)
      held_out = np.setdiff1d(np.arange(len(train_labels)), chosen)
      fits = {l2: fit_least_squares(train_features[chosen], train_labels[chosen], num_classes, l2)
              for l2 in l2_regs}
      if len(held_out):
        scores = [np.mean(fits[l2].predict(train_features[held_out]) == train_labels[held_out]) for l2 in l2_regs]
        l2_reg = l2_regs[int(np.argmax(scores))]
      else:
        l2_reg = l2_regs[len(l2_regs) // 2]
      chosen_regs.append(l2_reg)
      accuracies.append(float(np.mean(fits[l2_reg].predict(test_features) == test_labels)))
    results[k] = {'mean': float(np.mean(accuracies)), 'std': float(np.std(accuracies)), 'draws': accuracies,
                  'l2_regs': chosen_regs}
  return results


@dataclasses.dataclass(frozen=True)
class Task:
  """A task's images at the model's size and channel count, in [-1, 1]."""
  name: str
  num_classes: int
  train_images: np.ndarray  # The pool the shots are drawn from.
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray


def _match_channels(images: np.ndarray, channels: int) -> np.ndarray:
  if images.shape[-1] == channels:
    return images
  if images.shape[-1] == 1:
    return np.repeat(images, channels, axis=-1)  # Grey task, colour model.
  if channels == 1:
    return images.mean(axis=-1, keepdims=True)  # Colour task, grey model.
  raise errors.DataError(f'Cannot feed {images.shape[-1]}-channel images to a {channels}-channel model.')


def load_task(name: str, data_dir: Optional[str], image_size: int, channels: int, pool: int = 1000,
              max_test: Optional[int] = None, train_split: str = 'train', test_split: str = 'test') -> Task:
  """A tfds dataset (ours are built from local files on first use) preprocessed as the eval pipeline does."""
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow: only when loading data)
  builder = input_pipeline.get_builder(name, data_dir)
  tf = input_pipeline.tf

  def read(split: str, limit: Optional[int]):
    if split not in builder.info.splits:
      raise errors.DataError(f'Few-shot task {name!r} has no split {split!r}; it has {", ".join(builder.info.splits)}.')
    ds = builder.as_dataset(split=f'{split}[:{limit}]' if limit else split)
    ds = ds.map(lambda ex: input_pipeline.preprocess_eval(ex, image_size), num_parallel_calls=tf.data.AUTOTUNE)
    arrays = {'image': [], 'label': []}
    for batch in input_pipeline.tfds.as_numpy(ds.batch(1024)):
      arrays['image'].append(batch['image'])
      arrays['label'].append(batch['label'])
    return _match_channels(np.concatenate(arrays['image']), channels), np.concatenate(arrays['label'])

  train_images, train_labels = read(train_split, pool)
  test_images, test_labels = read(test_split, max_test)
  return Task(name=name, num_classes=builder.info.features['label'].num_classes, train_images=train_images,
              train_labels=train_labels, test_images=test_images, test_labels=test_labels)


class FeatureExtractor:
  """Pre-logits of any number of images, computed over the mesh in fixed-size batches (padded), identical on
  every process."""

  def __init__(self, model: models.VisionTransformer, mesh, batch_size: int = 256, cpu_matmul: str = 'onednn'):
    self.mesh, self.batch_size = mesh, batch_size
    sharding.check_batch_size(batch_size, mesh, field='fewshot.batch_size')
    self._features = jax.jit(lambda params, images: model.apply({'params': params}, images, pre_logits=True),
                             out_shardings=sharding.replicated(mesh),
                             compiler_options=host_cpu.compiler_options(cpu_matmul))

  def __call__(self, params, images: np.ndarray) -> np.ndarray:
    outputs = []
    per_process = self.batch_size // jax.process_count()
    first = jax.process_index() * per_process
    for start in range(0, len(images), self.batch_size):
      batch = images[start:start + self.batch_size]
      padded = np.zeros((self.batch_size, *images.shape[1:]), np.float32)
      padded[:len(batch)] = batch
      local = sharding.to_global_batch({'image': padded[first:first + per_process]}, self.mesh)['image']
      outputs.append(np.asarray(jax.device_get(self._features(params, local)))[:len(batch)])
    return np.concatenate(outputs)


class Evaluator:
  """The tasks of `config.fewshot`, loaded once, scored for any parameters of `model`."""

  def __init__(self, config: ml_collections.ConfigDict, model: models.VisionTransformer, mesh, channels: int,
               tasks: Optional[Sequence[str]] = None):
    settings = config.fewshot
    self.settings = settings
    self.extract = FeatureExtractor(model, mesh, settings.batch_size, config.cpu_matmul)
    self.tasks = [load_task(name, config.data_dir, config.image_size, channels, settings.pool, settings.max_test)
                  for name in (settings.tasks if tasks is None else tasks)]

  def __call__(self, params) -> Dict[str, Dict[int, dict]]:
    """{task: {k: {'mean', 'std', 'draws'}}}"""
    results = {}
    for task in self.tasks:
      train_features = self.extract(params, task.train_images)
      test_features = self.extract(params, task.test_images)
      results[task.name] = few_shot_accuracy(train_features, task.train_labels, test_features, task.test_labels,
                                             task.num_classes, self.settings.shots, self.settings.draws,
                                             self.settings.seed, tuple(self.settings.l2_regs))
    return results


def scalar_name(task: str, shots: int) -> str:
  """The TensorBoard name of a task's k-shot mean accuracy; its spread is logged under the same name + `_std`."""
  return f'fewshot/{task}/{shots}shot'


def parse_scalar_name(name: str) -> Tuple[str, int]:
  """(task, shots) of a `scalar_name`."""
  _, task, shots = name.split('/')
  return task, int(shots.removesuffix('shot'))


def scalars(results: Dict[str, Dict[int, dict]]) -> Dict[str, float]:
  """TensorBoard names: fewshot/<task>/<k>shot (mean accuracy) and .../<k>shot_std."""
  flat = {}
  for task, by_shots in results.items():
    for k, result in by_shots.items():
      flat[scalar_name(task, k)] = result['mean']
      flat[scalar_name(task, k) + '_std'] = result['std']
  return flat


def table(results: Dict[str, Dict[int, dict]]) -> str:
  shots = sorted({k for by_shots in results.values() for k in by_shots})
  lines = [f'{"task":28}' + ''.join(f'{f"{k}-shot":>16}' for k in shots)]
  for task, by_shots in results.items():
    lines.append(f'{task:28}' + ''.join(
        f'{by_shots[k]["mean"]:>9.2%} ±{by_shots[k]["std"]:5.1%}' if k in by_shots else f'{"":16}' for k in shots))
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------- command

def define_flags() -> None:
  """The command line; defined only when run as a program (as `vit_jax.analyze` does), so that importing this
  module next to `vit_jax.main` (which has --workdir too) does not clash."""
  flags.DEFINE_string('workdir', None, 'A vit_jax.main workdir: its config and newest checkpoint.')
  flags.DEFINE_string('npz', None, 'Or a published-layout .npz (with --config for its model).')
  flags.DEFINE_string('config', None, 'The config file of the --npz model (model, image size, data_dir).')
  flags.DEFINE_integer('step', None, 'Checkpoint step of --workdir (default: the newest).')
  flags.DEFINE_list('tasks', None, 'Tasks (tfds names; default: config.fewshot.tasks).')
  flags.DEFINE_list('shots', None, 'Shots per class (default: config.fewshot.shots).')
  flags.DEFINE_integer('draws', None, 'Draws of the shots, averaged (default: config.fewshot.draws).')
  flags.DEFINE_string('data_dir', None, 'tfds data_dir of the tasks (default: the config\'s).')
  flags.DEFINE_string('out', None, 'Also write the results to this JSON file.')


def _load():
  """(config, params, channels) of --workdir or --npz."""
  from vit_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from vit_jax import config_lib  # pylint: disable=g-import-not-at-top
  from vit_jax import timm_layout  # pylint: disable=g-import-not-at-top
  if bool(flags.FLAGS.workdir) == bool(flags.FLAGS.npz):
    raise app.UsageError('Give one of --workdir (a vit_jax.main run) or --npz (with --config).')
  if flags.FLAGS.workdir:
    config = config_lib.load_workdir_config(flags.FLAGS.workdir)
    params, step = checkpoints.restore_params(flags.FLAGS.workdir, flags.FLAGS.step)
    logging.info('Few-shot evaluation of %s, step %d.', flags.FLAGS.workdir, step)
  else:
    if not flags.FLAGS.config:
      raise app.UsageError('--npz needs --config: the config file its model was made with.')
    config = config_lib.load_config_file(flags.FLAGS.config)
    params = checkpoints.load_npz(flags.FLAGS.npz)
  return config, params, int(timm_layout.describe(params)['in_chans'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  host_cpu.setup()
  errors.quiet_library_logs()
  config, params, channels = _load()
  if flags.FLAGS.data_dir:
    config.data_dir = flags.FLAGS.data_dir
  if flags.FLAGS.shots:
    config.fewshot.shots = tuple(int(k) for k in flags.FLAGS.shots)
  if flags.FLAGS.draws:
    config.fewshot.draws = flags.FLAGS.draws
  tasks = flags.FLAGS.tasks or list(config.fewshot.tasks)
  if not tasks:
    raise app.UsageError('No tasks: pass --tasks=embedded_mnist,... (the config has no config.fewshot.tasks).')
  mesh = sharding.make_mesh(config.mesh)
  model = models.from_config(config, params['head']['kernel'].shape[-1])
  results = Evaluator(config, model, mesh, channels, tasks)(params)
  print(table(results))
  if flags.FLAGS.out:
    from vit_jax import paths  # pylint: disable=g-import-not-at-top
    paths.write_text(flags.FLAGS.out, json.dumps(results, indent=1))


if __name__ == '__main__':
  define_flags()
  errors.run(main)
