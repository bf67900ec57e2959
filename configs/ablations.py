"""The paper's ablations and its data-scale comparison at CPU scale, on the embedded Fashion-MNIST.

  python -m vit_jax.ablate --study=posemb --workdir=/tmp/ablate --seeds=0,1 --out=docs/results

Studies: classifier, posemb, data_scale, masked_patches.

`get_config()` is the base every row starts from: the plain ViT of `vit_mu7.py` (4x4 patches of 7x7, no stem;
the default until it gained a convolutional stem) trained for one epoch. `STUDIES` holds the rows: a label
and the config fields it changes. Rows with `series` and `train_size` are plotted as accuracy against
training-set size.
"""
import os

from vit_jax import config_lib


def get_config():
  config = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), 'vit_mu7.py'))
  config.num_epochs = 1.0
  config.warmup_steps = 100
  config.eval_every_steps = 100_000  # Only at the end.
  config.checkpoint_every_steps = 100_000
  return config


# Paper Appendix D.3 / Fig. 9: [CLS] token and global average pooling both work, at different learning rates.
CLASSIFIER = {
    'token, lr 3e-3': {'model.classifier': 'token', 'lr': 3e-3},
    'token, lr 1e-3': {'model.classifier': 'token', 'lr': 1e-3},
    'token, lr 3e-4': {'model.classifier': 'token', 'lr': 3e-4},
    'gap, lr 3e-3': {'model.classifier': 'gap', 'lr': 3e-3},
    'gap, lr 1e-3': {'model.classifier': 'gap', 'lr': 1e-3},
    'gap, lr 3e-4': {'model.classifier': 'gap', 'lr': 3e-4},
}

# Paper Appendix D.4 / Table 8 (no posemb 61.4, 1-D 64.2, 2-D 64.0, relative 64.0 for ViT-B/16 on ImageNet).
POSEMB = {
    'none': {'model.posemb': 'none'},
    '1-D learned': {'model.posemb': 'learn_1d'},
    '2-D learned': {'model.posemb': 'learn_2d'},
    'relative': {'model.posemb': 'relative'},
    '2-D sin-cos (fixed)': {'model.posemb': 'sincos_2d'},
}

# Paper Sec. 4.3 / Fig. 3-4: a ViT and a BiT ResNet of similar size (0.80M vs 0.81M parameters; 81 vs 105
# MFLOP per image and training step) on growing random subsets, each for the same 500 steps of 64 images.
DATA_SCALE_SIZES = (1_000, 4_000, 15_000, 60_000)
DATA_SCALE_MODELS = {
    'ViT-mu/7': {},
    'BiT ResNet (2, 2)': {'model.name': 'BiT-R26x1', 'model.resnet_layers': (2, 2)},
}
DATA_SCALE = {
    f'{model}, {size:,} images': {
        **fields, 'train_split': f'train[:{size}]', 'num_epochs': None, 'total_steps': 500,
        'shuffle_buffer': size, 'series': model, 'train_size': size}
    for model, fields in DATA_SCALE_MODELS.items() for size in DATA_SCALE_SIZES}

# Paper Sec. 4.6: masked patch prediction on the training images alone (labels unused), then one epoch of
# supervised training from it, against the same epoch from scratch. Rows run in this order; the fine-tuning
# row starts from the pretraining row's workdir (the label's slug).
MASKED_PATCHES = {
    'pretraining by masked patch prediction, 2 epochs': {'objective': 'masked_patches', 'num_epochs': 2.0},
    'fine-tuned from it, 1 epoch': {
        'init_from': '{study_dir}/pretraining_by_masked_patch_prediction_2_epochs/seed_{seed}'},
    'from scratch, 1 epoch': {},
}

STUDIES = {'classifier': CLASSIFIER, 'posemb': POSEMB, 'data_scale': DATA_SCALE,
           'masked_patches': MASKED_PATCHES}
