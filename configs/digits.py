"""Pip-only fallback of the default: scikit-learn's 8x8 digits (1,442 train / 355 test), under a minute.

  python -m vit_jax.main --config configs/digits.py --workdir /tmp/vit_digits
"""
from vit_jax import config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset = 'embedded_digits'
  config.train_split, config.eval_split = 'train', 'test'
  config.image_size = 8
  config.cache_data = True
  config.shuffle_buffer = 2_000
  config.pp.inception_crop = False
  config.pp.flip = False  # Digits are not mirror-symmetric.

  config.model.name = 'ViT-mu/2'  # 4x4 = 16 patches of 2x2.
  config.model.num_layers = 4
  config.model.classifier = 'gap'

  config.batch_size = 64
  config.num_epochs = 30.0
  config.lr = 2e-3
  config.weight_decay = 0.05
  config.schedule = 'cosine'
  config.warmup_steps = 100
  config.label_smoothing = 0.1

  config.log_every_steps = 100
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 200
  config.eval_batch_size = 355
  return config
