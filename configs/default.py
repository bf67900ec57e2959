"""The default: a small ViT on the embedded Fashion-MNIST, trained from scratch on a 2-core CPU in minutes.

  python -m vit_jax.main --config configs/default.py --workdir /tmp/vit_default

`vit_mu7.py` with a one-layer convolutional stem and four encoder blocks instead of six: the 3x3 convolution
gives each 7x7 patch local features that the linear patch projection lacks, and dropping two blocks pays for
it, so a step costs what the plain model's does. How it was chosen: docs/default_config.md.
"""
import os

from vit_jax import config_lib


def get_config():
  config = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), 'vit_mu7.py'))
  config.model.conv_stem = (32,)
  config.model.num_layers = 4
  config.model.classifier = 'token'  # The paper's [CLS]; scored above GAP here.
  config.label_smoothing = 0.1  # Worth about one epoch: 6 epochs with it beat 7 without.
  config.num_epochs = 6.0
  # One CPU device (config.cpu_devices unset): no collective, steps on the calling thread (host_cpu.py).
  return config
