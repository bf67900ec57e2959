"""ViT-L/16 on ImageNet, the paper's settings: `configs/vit_imagenet.py:L/16` under the design card's name."""
import os

from vit_jax import config_lib


def get_config():
  return config_lib.load_config_file(os.path.join(os.path.dirname(__file__), 'vit_imagenet.py') + ':L/16')
