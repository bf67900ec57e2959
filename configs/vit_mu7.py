"""A plain small ViT (patch embedding, no stem) on the embedded Fashion-MNIST, from scratch on 2 CPU cores
(results in docs/default_config.md). The base of the paper's ablations (`ablations.py`) and of `default.py`.

  python -m vit_jax.main --config configs/vit_mu7.py --workdir /tmp/vit_mu7
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

  # 4x4 = 16 patches of 7x7, batch 64: in a 10-minute CPU budget this saw the most data and scored best
  # (smaller patches learn more per image but run much slower; batch 64 stays in cache).
  config.model.name = 'ViT-mu/7'
  config.model.classifier = 'gap'

  config.batch_size = 64
  config.num_epochs = 6.0
  config.lr = 1e-3
  config.weight_decay = 0.05
  config.schedule = 'cosine'
  config.warmup_steps = 500
  config.label_smoothing = 0.0

  config.log_every_steps = 500
  config.eval_every_steps = 2_000
  config.checkpoint_every_steps = 1_000
  config.eval_batch_size = 1000
  return config
