"""ViT-B/16 pretraining on ImageNet with the paper's settings (Sec. 4.1, Appendix B.1, Table 3).

Adam (b1=0.9, b2=0.999), decoupled weight decay 0.1, batch 4096, 10k linear warmup then linear decay,
gradient clipping at global norm 1, dropout 0.1, 224px, a pre-logits layer of width D. The base learning
rate is the paper's for this model on JFT-300M (Table 3). Prepare the data once with `tfds build imagenet2012`.

  python -m vit_jax.main --config configs/vit_b16.py --workdir gs://bucket/vit_b16 --config.data_dir=...
"""
from vit_jax import config_lib


def get_config():
  config = config_lib.base_config()  # ImageNet, Adam, batch 4096, 10k warmup, linear decay, 224px.
  config.model.name = 'ViT-B/16'
  config.model.representation_size = 768
  config.model.dropout_rate = 0.1
  config.num_epochs = 300.0
  config.lr = 8e-4
  return config
