"""Pretraining a ViT with the paper's recipe for its dataset (Sec. 4.1, Appendix B.1, Table 3); the argument
names the variant, and after a comma the pretraining dataset (default: ImageNet-1k).

  python -m vit_jax.main --config configs/vit_imagenet.py:L/16 --workdir gs://bucket/vit_l16 --config.data_dir=...
  python -m vit_jax.main --config configs/vit_imagenet.py:R50+B/16 --workdir /ckpt/r50_b16 --config.data_dir=...
  python -m vit_jax.main --config configs/vit_imagenet.py:B/16,i21k --workdir ... --config.dataset=<your tfds name>

Every recipe: Adam (b1=0.9, b2=0.999), decoupled weight decay, batch 4096, 10k linear warmup, gradient clipping
at global norm 1, 224px, a pre-logits layer of width D. Per dataset (Table 3):

| recipe | dataset read | epochs | base lr | decay | weight decay | dropout |
|---|---|---|---|---|---|---|
| `i1k` (default) | `imagenet2012` (`tfds build imagenet2012`) | 300 | 3e-3 | cosine | 0.3 | 0.1 |
| `i21k` | `imagenet21k` (prepare it as a tfds dataset; not in tfds' catalog) | 90 | 1e-3 | linear | 0.03 | 0.1 |
| `jft` | `jft` (JFT-300M is not public: any tfds dataset of that scale) | 7 (L/16, H/14: 14) | by variant | linear | 0.1 | 0.0 |
"""
from vit_jax import config_lib
from vit_jax import models

# JFT-300M base learning rate by variant (Table 3). Sizes the paper did not train on JFT (Ti, S, mu) take the
# B/16 rate; any patch size of a size takes the size's rate unless listed.
JFT_LEARNING_RATES = {
    'B/16': 8e-4,
    'B/32': 8e-4,
    'L/16': 4e-4,
    'L/32': 6e-4,
    'H/14': 3e-4,
    'R50+B/16': 8e-4,
}
JFT_SIZE_LEARNING_RATES = {'L': 4e-4, 'H': 3e-4}
JFT_DEFAULT_LEARNING_RATE = 8e-4
JFT_LONG_RUNS = ('L/16', 'H/14')  # 14 epochs instead of 7.

RECIPES = ('i1k', 'i21k', 'jft')


def _recipe(recipe: str, short: str, size: str) -> dict:
  if recipe == 'i1k':
    return dict(dataset='imagenet2012', num_epochs=300.0, lr=3e-3, schedule='cosine', weight_decay=0.3,
                dropout_rate=0.1)
  if recipe == 'i21k':
    return dict(dataset='imagenet21k', num_epochs=90.0, lr=1e-3, schedule='linear', weight_decay=0.03,
                dropout_rate=0.1)
  if recipe == 'jft':
    lr = JFT_LEARNING_RATES.get(short, JFT_SIZE_LEARNING_RATES.get(size, JFT_DEFAULT_LEARNING_RATE))
    return dict(dataset='jft', num_epochs=14.0 if short in JFT_LONG_RUNS else 7.0, lr=lr, schedule='linear',
                weight_decay=0.1, dropout_rate=0.0)
  raise ValueError(f'Unknown pretraining recipe {recipe!r}: choose one of {", ".join(RECIPES)} '
                   f'(e.g. configs/vit_imagenet.py:{short},i21k).')


def get_config(argument: str = 'B/16'):
  variant, _, recipe = argument.partition(',')
  short = variant.replace('ViT-', '')  # 'L/16', 'R50+B/16', 'S/32', ...
  stem, _, vit = short.rpartition('+')
  name = f'{stem}+ViT-{vit}' if stem else f'ViT-{vit}'
  size = vit.split('/')[0]
  row = _recipe(recipe or 'i1k', short, size)
  config = config_lib.base_config()  # Adam, batch 4096, 10k warmup, gradient clipping, 224px.
  config.model.name = name
  config.model.representation_size = models.parse_variant(name)['hidden_size']  # The pre-logits width D.
  config.model.dropout_rate = row['dropout_rate']
  config.dataset = row['dataset']
  config.num_epochs = row['num_epochs']
  config.lr = row['lr']
  config.schedule = row['schedule']
  config.weight_decay = row['weight_decay']
  return config
