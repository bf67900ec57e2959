"""Pretraining a ViT on ImageNet with the paper's settings (Sec. 4.1, Appendix B.1, Table 3); the argument
names the variant.

  python -m vit_jax.main --config configs/vit_imagenet.py:L/16 --workdir gs://bucket/vit_l16 --config.data_dir=...
  python -m vit_jax.main --config configs/vit_imagenet.py:R50+B/16 --workdir /ckpt/r50_b16 --config.data_dir=...

Adam (b1=0.9, b2=0.999), decoupled weight decay 0.1, batch 4096, 10k linear warmup then linear decay,
gradient clipping at global norm 1, dropout 0.1, 224px, 300 epochs, a pre-logits layer of width D. The base
learning rate is the paper's for the variant on JFT-300M (Table 3). Prepare the data once with
`tfds build imagenet2012`.
"""
from vit_jax import config_lib
from vit_jax import models

# Base learning rate by variant (paper Table 3, JFT-300M). Sizes the paper did not train (Ti, S, mu) take the
# B/16 rate; any patch size of a size takes the size's rate unless listed.
LEARNING_RATES = {
    'B/16': 8e-4,
    'B/32': 8e-4,
    'L/16': 4e-4,
    'L/32': 6e-4,
    'H/14': 3e-4,
    'R50+B/16': 8e-4,
}
SIZE_LEARNING_RATES = {'L': 4e-4, 'H': 3e-4}
DEFAULT_LEARNING_RATE = 8e-4


def get_config(variant: str = 'B/16'):
  short = variant.replace('ViT-', '')  # 'L/16', 'R50+B/16', 'S/32', ...
  stem, _, vit = short.rpartition('+')
  name = f'{stem}+ViT-{vit}' if stem else f'ViT-{vit}'
  size = vit.split('/')[0]
  config = config_lib.base_config()  # ImageNet, Adam, batch 4096, 10k warmup, linear decay, 224px.
  config.model.name = name
  config.model.representation_size = models.parse_variant(name)['hidden_size']  # The pre-logits width D.
  config.model.dropout_rate = 0.1
  config.num_epochs = 300.0
  config.lr = LEARNING_RATES.get(short, SIZE_LEARNING_RATES.get(size, DEFAULT_LEARNING_RATE))
  return config
