"""Exports the latest checkpoint of a workdir as a `.npz` in the published ViT layout.

  python -m vit_jax.export --workdir /tmp/vit_default --out /tmp/vit_default.npz

Any tool that reads the published checkpoints (e.g. `ViT-B_16.npz`) reads the result.
"""
from absl import app
from absl import flags
import jax

from vit_jax import checkpoints

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a vit_jax.main run.')
_OUT = flags.DEFINE_string('out', None, 'Output .npz path.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  params, step = checkpoints.restore_params(_WORKDIR.value, _STEP.value)
  checkpoints.save_npz(params, _OUT.value)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  print(f'Wrote {_OUT.value}: {num_params:,} parameters of step {step} in the published layout.')


if __name__ == '__main__':
  app.run(main)
