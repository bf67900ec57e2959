"""Trains a ViT from scratch, evaluates it, checkpoints it; restarting with the same workdir resumes.

  python -m vit_jax.main --config configs/default.py --workdir /tmp/vit_default
  python -m vit_jax.main --config configs/vit_l16.py --workdir gs://bucket/vit_l16 --config.data_dir=...
"""
import logging as py_logging
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import tensorflow as tf

from vit_jax import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/default.py.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and TensorBoard summaries.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # tf.data only feeds the host; keep TensorFlow off any accelerator that JAX needs.
  tf.config.set_visible_devices([], 'GPU')
  # Orbax and tfds narrate every file they touch at INFO; keep their warnings, drop the chatter.
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= py_logging.WARNING or not any(
          part in record.pathname for part in ('/orbax/', '/tensorflow_datasets/')))
  workdir = _WORKDIR.value if '://' in _WORKDIR.value else os.path.abspath(_WORKDIR.value)
  result = train.train_and_evaluate(_CONFIG.value, workdir)
  print(f'Final test accuracy: {result["accuracy"]:.4f} ({result["correct"]}/{result["count"]} on '
        f'{_CONFIG.value.dataset}:{_CONFIG.value.eval_split}) after {result["step"]} steps.', flush=True)


if __name__ == '__main__':
  app.run(main)
