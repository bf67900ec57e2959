"""Exports a checkpoint of a workdir for other tools.

  python -m vit_jax.export --workdir /tmp/vit_default --out /tmp/vit_default.npz
  python -m vit_jax.export --workdir /tmp/vit_default --out /tmp/vit_default.pth --format torch

`npz`: the layout of the published ViT checkpoints (e.g. `ViT-B_16.npz`): any tool that reads those reads
ours (timm's `.npz` loader included). `torch`: a PyTorch `state_dict` with the key names of timm's
`VisionTransformer` (needs the `torch` extra); the command prints the timm constructor that takes it.
With a moving average of the parameters in the checkpoint (`config.ema_decay` > 0), that is what is exported
unless `--params=raw`.

This module never imports TensorFlow: PyTorch's triton crashes when loaded after it.
"""
from absl import app
from absl import flags
import jax

from vit_jax import checkpoints
from vit_jax import config_lib
from vit_jax import errors
from vit_jax import models
from vit_jax import paths

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a vit_jax.main run.')
_OUT = flags.DEFINE_string('out', None, 'Output path (.npz, or .pth for --format torch).')
_FORMAT = flags.DEFINE_enum('format', 'npz', ['npz', 'torch'], 'Published-layout .npz or timm state_dict.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_PARAMS = flags.DEFINE_enum('params', 'auto', ['auto', 'ema', 'raw'],
                            'auto: the moving average when the run kept one, else the parameters.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace --out if it exists (without it, an existing file is '
                                'refused).')
flags.mark_flags_as_required(['workdir', 'out'])


def save_torch(params, config, path: str) -> str:
  """Writes a timm `state_dict` atomically; returns the timm constructor call that loads it."""
  import torch  # pylint: disable=g-import-not-at-top  (optional dependency)
  from vit_jax import timm_layout  # pylint: disable=g-import-not-at-top
  info = timm_layout.describe(params)  # Refuses, naming the part, what timm cannot express.
  table = None
  if info['kind'] == 'vit':
    model = models.from_config(config, params['head']['kernel'].shape[-1])
    table = models.position_embedding_table(model, params, config.image_size)
  weights = timm_layout.state_dict(params, table)
  with paths.atomic_writer(path) as f:
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, f)
  return timm_layout.constructor(info, config.image_size)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  out = _OUT.value
  if paths.isdir(out):
    raise errors.UserError(f'--out={out} is a folder: give the path of the file to write, e.g. {out}/model.npz.')
  if paths.exists(out) and not _OVERWRITE.value:
    raise errors.UserError(f'{out} exists: pass --overwrite to replace it, or choose another --out.')
  ema = {'auto': None, 'ema': True, 'raw': False}[_PARAMS.value]
  params, step = checkpoints.restore_params(_WORKDIR.value, _STEP.value, ema=ema)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  try:
    if _FORMAT.value == 'npz':
      checkpoints.save_npz(params, out)
      print(f'Wrote {out}: {num_params:,} parameters of step {step} in the published layout.')
    else:
      constructor = save_torch(params, config_lib.load_workdir_config(_WORKDIR.value), out)
      print(f'Wrote {out}: {num_params:,} parameters of step {step} as a timm state_dict; load it with '
            f'{constructor}.')
  except OSError as e:
    raise errors.UserError(f'Cannot write {out}: {e.strerror or e}. Choose a writable --out.') from e


if __name__ == '__main__':
  errors.run(main)
