"""Fine-tuning ViT-B/16 at 384px with the paper's recipe (Sec. 4.1, Appendix B.1.1).

SGD with momentum 0.9, no weight decay, gradient clipping at global norm 1, batch 512, cosine decay after 500
warmup steps, 20k steps (ImageNet); 384px, so the 14x14 position embeddings are interpolated to 24x24. No
pre-logits layer (the paper drops it when fine-tuning). The head starts at zero for the new classes.

  python -m vit_jax.main --config configs/vit_b16_finetune.py --workdir /ckpt/ft \\
      --config.init_from=ViT-B_16.npz --config.data_dir=/data/tfds
  # Another dataset (the LR grid of the paper is {0.001, 0.003, 0.01, 0.03}; 10k steps for CIFAR):
  python -m vit_jax.main --config configs/vit_b16_finetune.py --workdir /ckpt/ft_c10 \\
      --config.init_from=ViT-B_16.npz --config.dataset=cifar10 --config.eval_split=test \\
      --config.total_steps=10000 --config.lr=0.03
"""
from vit_jax import config_lib


def get_config():
  config = config_lib.base_config()
  config.init_from = ''  # Required: a published .npz (e.g. ViT-B_16.npz) or a vit_jax workdir.
  config.model.name = 'ViT-B/16'
  config.image_size = 384
  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.weight_decay = 0.0
  config.grad_clip_norm = 1.0
  config.batch_size = 512
  config.total_steps = 20_000
  config.lr = 0.01
  config.schedule = 'cosine'
  config.warmup_steps = 500
  config.eval_every_steps = 2_000
  return config
