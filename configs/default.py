"""The default: a small ViT on the embedded Fashion-MNIST, trained from scratch on a 2-core CPU in minutes.

  python -m vit_jax.main --config configs/default.py --workdir /tmp/vit_default
"""
from vit_jax import config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset = 'embedded_fashion_mnist'  # Built from `apt-get install dataset-fashion-mnist`.
  config.train_split, config.eval_split = 'train', 'test'
  config.image_size = 28
  config.cache_data = True
  config.shuffle_buffer = 60_000
  config.pp.inception_crop = False  # Centred 28x28 items: random crops cost more accuracy than they give.
  config.pp.flip = True

  config.model.name = 'ViT-mu/4'  # 7x7 = 49 patches of 4x4.
  config.model.classifier = 'gap'

  config.batch_size = 128
  config.num_epochs = 8.0
  config.lr = 2e-3
  config.weight_decay = 0.05
  config.schedule = 'cosine'
  config.warmup_steps = 200
  config.label_smoothing = 0.1

  config.log_every_steps = 200
  config.eval_every_steps = 2_000
  config.checkpoint_every_steps = 1_000
  config.eval_batch_size = 1000
  return config
