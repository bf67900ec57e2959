"""Draws what a trained ViT learned, from the workdir of a `vit_jax.main` run, as PNG files:

  python -m vit_jax.analyze --workdir /tmp/vit_default --out /tmp/vit_default_figures

- `attention_maps.png`: test images and their attention rollout overlaid (paper Fig. 6);
- `position_embedding_similarity.png`: per patch, the cosine similarity of its position embedding with all
  others, on the patch grid (Fig. 7 centre);
- `mean_attention_distance.png`: per head, the mean attention distance in pixels against depth (Fig. 7 right);
- `embedding_filters.png`: top principal components of the patch-embedding filters (Fig. 7 left; of the
  first stem convolution when the model has a stem);
- `analysis.json`: the numbers behind the figures.
"""
import json

from absl import app
from absl import flags
import matplotlib.pyplot as plt  # Without a display, matplotlib picks its file-only backend itself.
import numpy as np

from vit_jax import analysis
from vit_jax import checkpoints
from vit_jax import config_lib
from vit_jax import errors
from vit_jax import host_cpu
from vit_jax import models
from vit_jax import paths


def define_flags() -> None:
  """The command line; defined only when run as a program (as in `vit_jax.ablate`), so that importing this
  module as a library next to `vit_jax.main` (which has --workdir too) does not clash."""
  flags.DEFINE_string('workdir', None, 'Workdir of a vit_jax.main run.')
  flags.DEFINE_string('out', None, 'Folder for the figures.')
  flags.DEFINE_integer('num_images', 64, 'Test images averaged over (the first 8 are drawn).')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.mark_flags_as_required(['workdir', 'out'])


def _show_image(ax, image):
  image = (np.asarray(image) + 1) / 2  # [-1, 1] -> [0, 1]
  ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap='gray' if image.shape[-1] == 1 else None)
  ax.axis('off')


def draw_attention_maps(images, rollout, path, num_drawn=8):
  num = min(num_drawn, len(images))
  fig, axes = plt.subplots(2, num, figsize=(1.6 * num, 3.4), squeeze=False)
  size = images.shape[1]
  for i in range(num):
    _show_image(axes[0, i], images[i])
    _show_image(axes[1, i], images[i])
    axes[1, i].imshow(rollout[i], cmap='inferno', alpha=0.6, extent=(-0.5, size - 0.5, size - 0.5, -0.5),
                      interpolation='bilinear')
  axes[0, 0].set_title('input', fontsize=8, loc='left')
  axes[1, 0].set_title('attention rollout', fontsize=8, loc='left')
  fig.tight_layout()
  with paths.atomic_writer(path) as f:
    fig.savefig(f, format='png', dpi=100)
  plt.close(fig)


def draw_position_similarity(similarity, path):
  rows, cols = similarity.shape[:2]
  fig, axes = plt.subplots(rows, cols, figsize=(max(0.8 * cols + 1.5, 6), max(0.8 * rows, 4)),
                           squeeze=False)
  for i in range(rows):
    for j in range(cols):
      image = axes[i, j].imshow(similarity[i, j], vmin=-1, vmax=1, cmap='viridis')
      axes[i, j].set_xticks([])
      axes[i, j].set_yticks([])
  fig.suptitle('Position embedding similarity (cosine): panel (i, j) compares patch (i, j) with all',
               fontsize=9)
  fig.colorbar(image, ax=axes, shrink=0.8)
  with paths.atomic_writer(path) as f:
    fig.savefig(f, format='png', dpi=100)
  plt.close(fig)


def draw_attention_distance(distance, image_size, path):
  layers, heads = distance.shape
  fig, ax = plt.subplots(figsize=(5, 4))
  for head in range(heads):
    ax.scatter(np.arange(layers), distance[:, head], s=14, label=f'head {head}')
  ax.set_xlabel('network depth (layer)')
  ax.set_ylabel('mean attention distance (pixels)')
  ax.set_ylim(0, image_size)
  ax.set_title('Mean attention distance per head')
  if heads <= 16:
    ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  with paths.atomic_writer(path) as f:
    fig.savefig(f, format='png', dpi=100)
  plt.close(fig)


def draw_embedding_filters(components, variance, path, layer='patch-embedding'):
  num = len(components)
  cols = min(num, 7)
  rows = -(-num // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.4 * rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis('off')
  for i, (component, ratio) in enumerate(zip(components, variance)):
    scaled = (component - component.min()) / max(component.max() - component.min(), 1e-12)
    ax = axes.ravel()[i]
    ax.imshow(scaled[..., 0] if scaled.shape[-1] == 1 else scaled, cmap='gray', interpolation='nearest')
    ax.set_title(f'{ratio:.1%}', fontsize=7)
  fig.suptitle(f'Principal components of the {layer} filters (share of variance)', fontsize=8)
  fig.tight_layout()
  with paths.atomic_writer(path) as f:
    fig.savefig(f, format='png', dpi=100)
  plt.close(fig)


def load_test_images(config, num_images):
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow, only here)
  builder = input_pipeline.get_builder(config.dataset, config.data_dir)
  dataset = input_pipeline.eval_dataset(builder, config, num_images, num_images)
  batch = next(dataset.as_numpy_iterator())
  return batch['image'][batch['mask'] > 0], batch['label'][batch['mask'] > 0]


def pixel_filters(params):
  """(name, kernel) of the first layer that sees pixels: the patch embedding of a plain ViT (the paper's
  Fig. 7), else the first convolution of the stem (`conv_stem` or the hybrid's ResNet)."""
  for name in ('stem_conv_0', 'conv_root', 'embedding'):
    if name in params:
      return name, params[name]['kernel']
  raise ValueError('No patch embedding or stem convolution in these parameters.')


def analyze(workdir: str, out: str, num_images: int = 64, step=None) -> dict:
  config = config_lib.load_workdir_config(workdir)
  if config.objective != 'classification' or config.model.name.startswith('BiT-'):
    raise errors.WorkdirError(f'{workdir} holds a {config.model.name} run with objective '
                              f'{config.objective!r}: the figures are of ViT classifiers '
                              f'(fine-tune it first, or pick a classification run).')
  params, step = checkpoints.restore_params(workdir, step)
  model = models.from_config(config, params['head']['kernel'].shape[-1])
  images, labels = load_test_images(config, num_images)
  weights = analysis.attention_weights(model, params, images, config.cpu_matmul)
  logits = analysis.logits(model, params, images, config.cpu_matmul)
  grid = model.token_grid((config.image_size, config.image_size))
  prefix = 1 if model.classifier == 'token' else 0
  rollout = analysis.attention_rollout(weights, prefix, grid)
  table = models.position_embedding_table(model, params, config.image_size)
  similarity = analysis.position_embedding_similarity(table, grid, prefix)
  patch_pixels = config.image_size / grid[0]
  distance = analysis.mean_attention_distance(weights, grid, patch_pixels, prefix)
  filter_layer, kernel = pixel_filters(params)
  kernel = np.asarray(kernel)
  components, variance = analysis.embedding_filter_components(kernel, 28)

  draw_attention_maps(images, rollout, paths.join(out, 'attention_maps.png'))
  draw_position_similarity(similarity, paths.join(out, 'position_embedding_similarity.png'))
  draw_attention_distance(distance, config.image_size, paths.join(out, 'mean_attention_distance.png'))
  draw_embedding_filters(components, variance, paths.join(out, 'embedding_filters.png'),
                         'patch-embedding' if filter_layer == 'embedding' else f'stem ({filter_layer})')
  # Neighbours vs far patches: how much 2-D structure the position embeddings learned.
  rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing='ij')
  flat = similarity.reshape(grid[0] * grid[1], -1)
  gap = np.abs(rows.ravel()[:, None] - rows.ravel()[None]) + np.abs(cols.ravel()[:, None] - cols.ravel()[None])
  summary = dict(
      workdir=workdir, step=step, model=config.model.name, image_size=config.image_size, grid=list(grid),
      num_images=int(len(images)),
      accuracy_on_these_images=float(np.mean(np.argmax(np.asarray(logits), -1) == labels)),
      mean_attention_distance_px=np.round(distance, 2).tolist(),
      posemb_similarity_neighbours=float(flat[gap == 1].mean()) if np.any(gap == 1) else None,
      posemb_similarity_far=float(flat[gap >= max(grid)].mean()) if np.any(gap >= max(grid)) else None,
      filter_variance_top=np.round(variance[:8], 4).tolist())
  paths.write_text(paths.join(out, 'analysis.json'), json.dumps(summary, indent=1))
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  host_cpu.setup()  # One CPU device, as the main job runs it.
  summary = analyze(args.workdir, args.out, args.num_images, args.step)
  print(json.dumps(summary, indent=1))
  print(f'Wrote the figures of step {summary["step"]} to {args.out}.')


if __name__ == '__main__':
  define_flags()
  errors.run(main)
