"""Every config file loads, takes command-line overrides, and its train step compiles from abstract shapes;
`config_lib.validate` names what is wrong with a config before anything starts."""
import glob
import json
import os
import re
import time

from absl import flags
import jax
import pytest
from ml_collections import config_flags

from conftest import CONFIG_DIR, load_config
from vit_jax import config_lib
from vit_jax import errors
from vit_jax import models
from vit_jax import sharding
from vit_jax import train

CONFIG_FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, '*.py')))
IMAGENET = config_lib.load_config_module(os.path.join(CONFIG_DIR, 'vit_imagenet.py'))
# Every variant of the ImageNet config's table, and two registry variants it does not list.
IMAGENET_CONFIGS = [f'vit_imagenet.py:{variant}' for variant in (*IMAGENET.JFT_LEARNING_RATES, 'Ti/16', 'S/32')]
# (classes, channels) of each config's dataset: the step compiles without the data being present.
DATASET_SHAPES = {'imagenet2012': (1000, 3), 'embedded_fashion_mnist': (10, 1), 'embedded_digits': (10, 1)}
# Compiled in the fast loop; the ImageNet variants (3-20 s each on 2 cores, at 2 blocks) in the full suite.
# `vit_imagenet.py` alone is B/16 and `vit_l16.py` is L/16 (test_the_imagenet_config_takes_...).
FAST_COMPILES = ('default.py', 'digits.py', 'vit_mu7.py', 'ablations.py',
                 'vit_b16_finetune.py')


def _load_complete(name):
  """The config as a user runs it: with the pretrained weights a fine-tuning config asks for."""
  config = load_config(name)
  if config.init_from == '':  # pylint: disable=g-explicit-bool-comparison
    config.init_from = 'ViT-B_16.npz'
  return config


def test_the_config_files_of_the_design_are_there():
  assert {'default.py', 'vit_l16.py', 'vit_imagenet.py'} <= set(CONFIG_FILES)
  assert {'B/16', 'L/16', 'H/14', 'R50+B/16'} <= set(IMAGENET.JFT_LEARNING_RATES)


@pytest.mark.parametrize('name', CONFIG_FILES + IMAGENET_CONFIGS)
def test_config_loads_validates_and_names_a_known_model_and_dataset(name):
  config = _load_complete(name)
  assert config.dataset in DATASET_SHAPES
  config_lib.validate(config)
  models.from_config(config, num_classes=10)  # Raises on an unknown variant or option.


@pytest.mark.parametrize('name', IMAGENET_CONFIGS)
def test_paper_pretraining_settings(name):
  config = load_config(name)
  assert (config.optimizer, config.b1, config.b2) == ('adam', 0.9, 0.999)
  assert (config.weight_decay, config.batch_size, config.warmup_steps) == (0.3, 4096, 10_000)  # ImageNet-1k's.
  assert (config.schedule, config.image_size, config.grad_clip_norm) == ('cosine', 224, 1.0)
  assert (config.model.dropout_rate, config.num_epochs, config.lr) == (0.1, 300.0, 3e-3)
  # The pre-logits layer has the width D of the variant.
  assert config.model.representation_size == models.parse_variant(config.model.name)['hidden_size']


# The paper's pretraining rows (Table 3; PAPER.md): per dataset, (epochs, base lr, decay, weight decay,
# dropout); on JFT-300M the rate and epochs depend on the variant.
PAPER_RECIPES = {
    'i1k': {'B/16': (300, 3e-3, 'cosine', 0.3, 0.1), 'L/16': (300, 3e-3, 'cosine', 0.3, 0.1)},
    'i21k': {'B/16': (90, 1e-3, 'linear', 0.03, 0.1), 'L/16': (90, 1e-3, 'linear', 0.03, 0.1)},
    'jft': {'B/16': (7, 8e-4, 'linear', 0.1, 0.0), 'B/32': (7, 8e-4, 'linear', 0.1, 0.0),
            'L/32': (7, 6e-4, 'linear', 0.1, 0.0), 'L/16': (14, 4e-4, 'linear', 0.1, 0.0),
            'H/14': (14, 3e-4, 'linear', 0.1, 0.0), 'R50+B/16': (7, 8e-4, 'linear', 0.1, 0.0)},
}


def test_the_imagenet_config_takes_the_variant_and_the_paper_recipe_of_its_dataset():
  for recipe, rows in PAPER_RECIPES.items():
    for variant, row in rows.items():
      config = load_config(f'vit_imagenet.py:{variant},{recipe}')
      assert (config.num_epochs, config.lr, config.schedule, config.weight_decay,
              config.model.dropout_rate) == row, (variant, recipe)
      assert (config.batch_size, config.warmup_steps, config.grad_clip_norm, config.b1, config.b2) == (
          4096, 10_000, 1.0, 0.9, 0.999)
  # The default is the row of the dataset the config reads: ImageNet-1k.
  for variant in ('L/16', 'B/16', 'ViT-L/16'):
    default = load_config(f'vit_imagenet.py:{variant}')
    assert default.dataset == 'imagenet2012' and default.to_dict() == load_config(
        f'vit_imagenet.py:{variant},i1k').to_dict()
  assert load_config('vit_imagenet.py:R50+B/16').model.name == 'R50+ViT-B/16'
  alias = load_config('vit_l16.py')  # The design card's command.
  assert alias.to_dict() == load_config('vit_imagenet.py:L/16').to_dict()
  with pytest.raises(ValueError, match="Unknown model variant 'ViT-Q/16'"):
    load_config('vit_imagenet.py:Q/16')
  with pytest.raises(ValueError, match="Unknown pretraining recipe 'jft300m': choose one of i1k, i21k, jft"):
    load_config('vit_imagenet.py:B/16,jft300m')


def _parse(argv):
  """Parses argv as `python -m vit_jax.main` does (overrides are read from the argv given here)."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_command_line_overrides():
  config = _parse(['main', f'--config={os.path.join(CONFIG_DIR, "vit_l16.py")}', '--config.batch_size=512',
                   '--config.model.name=ViT-S/16', '--config.model.num_layers=3', '--config.lr=0.01'])
  assert (config.batch_size, config.model.name, config.model.num_layers, config.lr) == (512, 'ViT-S/16', 3, 0.01)
  with pytest.raises(AttributeError, match="Did you mean \"batch_size\""):  # A typo is an error.
    _parse(['main', f'--config={os.path.join(CONFIG_DIR, "vit_l16.py")}', '--config.batch_sise=512'])
  # `path:arg`, as the ImageNet config takes its variant.
  config = _parse(['main', f'--config={os.path.join(CONFIG_DIR, "vit_imagenet.py")}:H/14', '--config.lr=1e-4'])
  assert (config.model.name, config.model.representation_size, config.lr) == ('ViT-H/14', 1280, 1e-4)

@pytest.mark.parametrize('name', [name if name in FAST_COMPILES else pytest.param(name, marks=pytest.mark.slow)
                                  for name in CONFIG_FILES + IMAGENET_CONFIGS
                                  if name not in ('vit_imagenet.py', 'vit_l16.py')])
def test_train_step_compiles_ahead_of_time_from_abstract_shapes(name):
  """The real step of each config (ViT-H/14 included), batch 2: lowered and compiled, no weights made. The
  ImageNet variants at 2 of their blocks: every kind of layer at the variant's widths, heads and patch size;
  their full depth only repeats the block, and its compile time and memory are BENCHMARKS.md's."""
  config = _load_complete(name)
  if name.startswith('vit_imagenet.py:'):
    config.model.num_layers = 2
  num_classes, channels = DATASET_SHAPES[config.dataset]
  mesh = sharding.make_mesh(config.mesh)
  config.batch_size = 2 * mesh.devices.size
  config.eval_batch_size = None
  run = train.setup(config, mesh, num_classes, num_steps=100_000, channels=channels)
  state, batch = run.abstract_state, run.abstract_batch
  start = time.perf_counter()
  compiled = run.train_fn.lower(state, batch).compile()
  print(f'{name}: compiled in {time.perf_counter() - start:.1f}s')
  assert isinstance(jax.tree.leaves(state)[0], jax.ShapeDtypeStruct)
  flops = compiled.cost_analysis()
  flops = (flops[0] if isinstance(flops, (list, tuple)) else flops)['flops']
  # Training costs about 3x the forward pass; a ViT forward pass costs at least 2 FLOPs per parameter per token.
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  assert flops > 3 * 2 * num_params * config.batch_size


def test_a_workdir_resumes_only_under_its_own_config_or_a_longer_schedule(tmp_path):
  recorded = load_config('default.py')
  config_lib.save_workdir_config(recorded, str(tmp_path))
  longer = load_config('default.py')
  longer.num_epochs, longer.eval_every_steps, longer.mesh.data = 9.0, 100, 2
  longer.accum_steps, longer.model.remat = 4, True  # The same update, in less memory per device.
  config_lib.check_resumable(longer, str(tmp_path))  # Extending the run and logging more often are fine.
  other = load_config('default.py')
  other.lr, other.model.conv_stem = 3e-3, (16,)
  with pytest.raises(ValueError, match=re.escape(f'lr: {recorded.lr} -> 0.003; model.conv_stem: [16, 16] -> [16]')):
    config_lib.check_resumable(other, str(tmp_path))
  for field, value in (('dtype', 'bfloat16'), ('scan', True)):  # Other math; another parameter layout.
    other = load_config('default.py')
    (other.model if field == 'scan' else other)[field] = value
    with pytest.raises(ValueError, match=field):
      config_lib.check_resumable(other, str(tmp_path))
  # Checkpoints without a readable record: nothing shows the config continues their run, unless adopted.
  (tmp_path / 'lost').mkdir()
  with pytest.raises(errors.WorkdirError, match=r'config.json is missing, but .* --adopt_config'):
    config_lib.check_resumable(other, str(tmp_path / 'lost'))
  (tmp_path / 'lost' / 'config.json').write_text('{"lr": 0.0')  # Cut short.
  with pytest.raises(errors.WorkdirError, match='config.json is unreadable'):
    config_lib.check_resumable(other, str(tmp_path / 'lost'))
  config_lib.check_resumable(other, str(tmp_path / 'lost'), adopt=True)


def test_a_workdir_recorded_before_newer_fields_reads_with_their_defaults(tmp_path):
  recorded = load_config('default.py')
  config_lib.save_workdir_config(recorded, str(tmp_path))
  record = json.load(open(tmp_path / 'config.json'))
  del record['fewshot'], record['cpu_matmul'], record['model']['scan']  # As a run of an older version wrote it.
  record['lr'] = 3e-3
  (tmp_path / 'config.json').write_text(json.dumps(record))
  config = config_lib.load_workdir_config(str(tmp_path))
  base = config_lib.base_config()
  assert config.cpu_matmul == base.cpu_matmul and config.model.scan is False
  assert dict(config.fewshot) == base.fewshot.to_dict()
  assert config.lr == 3e-3 and config.model.conv_stem == (16, 16)  # What was recorded wins.


def test_validate_names_every_bad_field_and_its_fix():
  config = load_config('digits.py')
  config.update(dict(lr=-1e-3, optimizer='lamb', ema_decay=1.0, accum_steps=5, objective='masked_patches',
                     init_from='/some/workdir', compilation_cache_dir='none'))
  with pytest.raises(ValueError) as error:
    config_lib.validate(config)
  message = str(error.value)
  for part in ('config.lr=-0.001', "Unknown optimizer 'lamb'", 'ema_decay=1.0', 'accum_steps=5',
               'Masked patch prediction pretrains from scratch',
               "compilation_cache_dir='none' would be a folder of that name: --config.compilation_cache_dir=''"):
    assert part in message, (part, message)
  finetune = load_config('vit_b16_finetune.py')  # Its init_from is left for the user to give.
  with pytest.raises(ValueError, match='set --config.init_from'):
    config_lib.validate(finetune)
  finetune.init_from = 'ViT-B_16.npz'
  config_lib.validate(finetune)
  no_length = load_config('digits.py')
  no_length.num_epochs = None
  with pytest.raises(ValueError, match='total_steps or --config.num_epochs'):
    config_lib.validate(no_length)
  rates = load_config('digits.py')
  rates.update(dict(total_steps=50, warmup_steps=50, weight_decay=-0.1, label_smoothing=1.0, b2=1.0,
                    grad_clip_norm=-1.0, num_epochs=-2.0))
  rates.model.dropout_rate, rates.model.posemb = 1.5, 'learned'
  with pytest.raises(errors.ConfigError) as error:
    config_lib.validate(rates)
  message = str(error.value)
  for part in ('warmup_steps=50 is not below the 50 training steps', 'weight_decay=-0.1 must not be negative',
               'label_smoothing=1.0 must be in [0, 1)', 'b2=1.0 must be in [0, 1)', 'grad_clip_norm=-1.0',
               'num_epochs=-2.0 must be positive', 'model.dropout_rate=1.5', "Unknown model.posemb 'learned'"):
    assert part in message, (part, message)
