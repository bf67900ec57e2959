"""Every config file loads, takes command-line overrides, and its train step compiles from abstract shapes."""
import glob
import os
import time

from absl import flags
import jax
import pytest
from ml_collections import config_flags

from conftest import CONFIG_DIR, load_config
from vit_jax import models
from vit_jax import train

CONFIG_FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, '*.py')))
# (classes, channels) of each config's dataset: the step compiles without the data being present.
DATASET_SHAPES = {'imagenet2012': (1000, 3), 'embedded_fashion_mnist': (10, 1), 'embedded_digits': (10, 1)}
PAPER_PRETRAINING = ('vit_b16.py', 'vit_l16.py', 'vit_h14.py', 'r50_vit_b16.py')


def test_the_config_files_of_the_design_are_there():
  assert set(PAPER_PRETRAINING) | {'default.py'} <= set(CONFIG_FILES)


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_config_loads_and_names_a_known_model_and_dataset(name):
  config = load_config(name)
  assert config.dataset in DATASET_SHAPES
  models.from_config(config, num_classes=10)  # Raises on an unknown variant or option.


@pytest.mark.parametrize('name', PAPER_PRETRAINING)
def test_paper_pretraining_settings(name):
  config = load_config(name)
  assert (config.optimizer, config.b1, config.b2) == ('adam', 0.9, 0.999)
  assert (config.weight_decay, config.batch_size, config.warmup_steps) == (0.1, 4096, 10_000)
  assert (config.schedule, config.image_size, config.grad_clip_norm) == ('linear', 224, 1.0)


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

@pytest.mark.parametrize('name', CONFIG_FILES)
def test_train_step_compiles_ahead_of_time_from_abstract_shapes(name):
  """The real step of each config (ViT-H/14 included), batch 2: lowered and compiled, no weights made."""
  config = load_config(name)
  num_classes, channels = DATASET_SHAPES[config.dataset]
  mesh = train.make_mesh(config.mesh)
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
  from vit_jax import config_lib  # pylint: disable=g-import-not-at-top
  recorded = load_config('default.py')
  config_lib.save_workdir_config(recorded, str(tmp_path))
  longer = load_config('default.py')
  longer.num_epochs, longer.eval_every_steps, longer.mesh.data = 9.0, 100, 2
  config_lib.check_resumable(longer, str(tmp_path))  # Extending the run and logging more often are fine.
  other = load_config('default.py')
  other.lr, other.model.conv_stem = 3e-3, (16,)
  with pytest.raises(ValueError, match=r'lr: 0.001 -> 0.003; model.conv_stem: \[32\] -> \[16\]'):
    config_lib.check_resumable(other, str(tmp_path))
  config_lib.check_resumable(other, str(tmp_path / 'fresh'))  # No recorded run: nothing to compare.
