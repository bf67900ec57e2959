"""The study runner (`vit_jax.ablate`) and the study table of `configs/ablations.py`."""
import json
import os

import matplotlib.image
import pytest

from conftest import CONFIG_DIR
from vit_jax import ablate
from vit_jax import config_lib
from vit_jax import models


def test_every_row_of_every_study_builds_its_model():
  module = config_lib.load_config_module(os.path.join(CONFIG_DIR, 'ablations.py'))
  assert set(module.STUDIES) == {'classifier', 'posemb', 'data_scale', 'masked_patches', 'transfer',
                                 'upstream_scale'}
  assert {row['model.posemb'] for row in module.POSEMB.values()} == set(models.POSEMB_KINDS)
  base = module.get_config()
  for study, rows in module.STUDIES.items():
    slugs = []
    for label, row in rows.items():
      fields = {k: v for k, v in row.items() if k not in (*ablate.PLOT_KEYS, ablate.UNTRAINED)}
      config = config_lib.override(base, fields)  # Raises on a misspelt field.
      models.count_params(models.from_config(config, 10), config.image_size, channels=1)
      if config.init_from:  # Fine-tuning rows start from a row that runs before them.
        assert config.init_from.split('/')[-2] in slugs, (study, label)
      slugs.append(ablate.slug(label))
  # Transfer: every task is fine-tuned and trained from scratch for the same steps, the upstream never sees the
  # held-out classes, and the few-shot tasks are the transfer tasks.
  transfer = module.TRANSFER
  for task in module.TRANSFER_TASKS:
    tuned, scratch = transfer[f'{task}: fine-tuned from the upstream'], transfer[f'{task}: from scratch']
    assert tuned['total_steps'] == scratch['total_steps'] and tuned['dataset'] == scratch['dataset']
    assert tuned['optimizer'] == 'sgd' and 'init_from' not in scratch
  assert set(module.FEWSHOT_TASKS) == {fields['dataset'] for fields in module.TRANSFER_TASKS.values()}
  assert module.UPSTREAM['dataset'] == 'embedded_fashion_mnist_seven'
  sizes = [row['train_size'] for row in module.DATA_SCALE.values()]
  assert all(row['train_split'] == f'train[:{row["train_size"]}]' for row in module.DATA_SCALE.values())
  assert max(sizes) == 60_000 and len(set(sizes)) >= 3


def test_override_is_checked():
  base = config_lib.load_config_file(os.path.join(CONFIG_DIR, 'default.py'))
  config = config_lib.override(base, {'model.posemb': 'none', 'lr': 3e-4})
  assert (config.model.posemb, config.lr, base.model.posemb) == ('none', 3e-4, 'learn_1d')
  with pytest.raises(KeyError, match='model.posemd'):
    config_lib.override(base, {'model.posemd': 'none'})


def test_series_plot_adds_a_few_shot_panel_and_finished_runs_take_the_rows_description(tmp_path):
  # A finished run is drawn as its row says now (the plot keys describe a result, they did not make it).
  run_dir = tmp_path / 'upstream_on_10' / 'seed_0'
  run_dir.mkdir(parents=True)
  (run_dir / ablate.RESULT_FILE).write_text(json.dumps({'label': 'upstream on 10%', 'accuracy': 0.8,
                                                        'series': 'old name'}))
  finished = ablate.finished_result(str(tmp_path), 'upstream on 10%', 0, {'lr': 1.0, 'train_size': 4200})
  assert finished == {'label': 'upstream on 10%', 'accuracy': 0.8, 'train_size': 4200}
  assert ablate.finished_result(str(tmp_path), 'upstream on 30%', 0, {}) is None

  def line(train_size, mean, **fields):
    return {'train_size': train_size, 'mean': mean, 'std': 0.01, **fields}
  tuned = [line(n, a, series='MNIST, fine-tuned') for n, a in ((4200, 0.84), (42000, 0.87))]
  widths = {}
  for name, upstream_fewshot in (('one', {}), ('two', {'fewshot/embedded_mnist/5shot': {'mean': 0.3, 'std': None},
                                                     'fewshot/embedded_mnist/10shot': {'mean': 0.4, 'std': None}})):
    upstream = [line(n, 0.8, fewshot=upstream_fewshot) for n in (4200, 42000)]
    ablate.plot_series(upstream + tuned, str(tmp_path / f'{name}.png'))
    widths[name] = matplotlib.image.imread(str(tmp_path / f'{name}.png')).shape[1]
  assert widths['two'] > 1.8 * widths['one']  # The few-shot panel beside the fine-tuned one.


STUDY_FILE = '''
import os
from vit_jax import config_lib

def get_config():
  config = config_lib.load_config_file(os.path.join({config_dir!r}, 'digits.py'))
  config.model.num_layers = 1
  config.total_steps, config.warmup_steps = 8, 2
  config.num_epochs = None
  config.log_every_steps = 4
  config.data_dir = {data_dir!r}
  return config

STUDIES = {{'scale': {{
    'ViT, 300': {{'train_split': 'train[:300]', 'series': 'ViT', 'train_size': 300}},
    'ViT, 900': {{'train_split': 'train[:900]', 'series': 'ViT', 'train_size': 900}},
    'ResNet, 300': {{'model.name': 'BiT-R26x1', 'model.resnet_layers': (1,), 'model.num_layers': None,
                    'train_split': 'train[:300]', 'series': 'ResNet', 'train_size': 300}},
}}}}
'''


TRANSFER_FILE = '''
import os
from vit_jax import config_lib

def get_config():
  config = config_lib.load_config_file(os.path.join({config_dir!r}, 'digits.py'))
  config.model.num_layers = 1
  config.total_steps, config.warmup_steps = 8, 2
  config.num_epochs = None
  config.data_dir = {data_dir!r}
  config.fewshot.tasks, config.fewshot.shots, config.fewshot.max_test = ('embedded_digits',), (1, 5), 100
  return config

STUDIES = {{'transfer': {{
    'upstream': {{}},
    'untrained': {{'untrained': True}},
    'fine-tuned': {{'init_from': '{{study_dir}}/upstream/seed_{{seed}}', 'optimizer': 'sgd', 'lr': 0.01,
                    'fewshot.tasks': ()}},
}}}}
'''


@pytest.mark.slow
def test_transfer_study_scores_few_shot_of_trained_and_untrained_models(tmp_path, data_dir):
  config_file = tmp_path / 'transfer.py'
  config_file.write_text(TRANSFER_FILE.format(config_dir=CONFIG_DIR, data_dir=data_dir))
  out = tmp_path / 'out'
  lines = ablate.run_study('transfer', str(config_file), str(tmp_path / 'runs'), str(out), seeds=[0])
  upstream, untrained, tuned = lines
  assert untrained['mean'] is None and untrained['seeds'] == {}  # Nothing trained, no test accuracy.
  assert not (tmp_path / 'runs' / 'transfer' / 'untrained' / 'seed_0' / 'checkpoints').exists()
  for line in (upstream, untrained):
    assert set(line['fewshot']) == {'fewshot/embedded_digits/1shot', 'fewshot/embedded_digits/5shot'}
    assert all(0.0 <= v['mean'] <= 1.0 for v in line['fewshot'].values())
  assert upstream['fewshot'] != untrained['fewshot']  # Training changed the representation.
  assert tuned['fewshot'] == {} and 0.0 <= tuned['mean'] <= 1.0
  table = (out / 'transfer.md').read_text()
  assert 'embedded_digits 1-shot' in table and '| untrained | - |' in table


@pytest.mark.slow
def test_run_study_trains_each_row_writes_table_and_plot_and_resumes(tmp_path, data_dir):
  config_file = tmp_path / 'study.py'
  config_file.write_text(STUDY_FILE.format(config_dir=CONFIG_DIR, data_dir=data_dir))
  out = tmp_path / 'out'
  lines = ablate.run_study('scale', str(config_file), str(tmp_path / 'runs'), str(out), seeds=[0, 1])
  assert [line['label'] for line in lines] == ['ViT, 300', 'ViT, 900', 'ResNet, 300']
  for line in lines:
    assert set(line['seeds']) == {0, 1} and all(0.0 <= a <= 1.0 for a in line['seeds'].values())
  assert lines[2]['params'] != lines[0]['params']  # The ResNet row really built a ResNet.
  record = json.loads((out / 'scale.json').read_text())
  assert len(record['runs']) == 6 and all(run['steps'] == 8 for run in record['runs'])
  table = (out / 'scale.md').read_text()
  assert '| ViT, 900 |' in table and 'seed 1' in table
  assert matplotlib.image.imread(str(out / 'scale.png')).shape[0] > 100
  # Run again: finished runs are read back, not trained again.
  marker = tmp_path / 'runs' / 'scale' / 'vit_300' / 'seed_0' / ablate.RESULT_FILE
  before = marker.stat().st_mtime
  again = ablate.run_study('scale', str(config_file), str(tmp_path / 'runs'), str(out), seeds=[0, 1],
                           rows=['vit_300'])
  assert marker.stat().st_mtime == before
  assert [line['label'] for line in again] == ['ViT, 300', 'ViT, 900', 'ResNet, 300']  # Others read back.
  assert not (tmp_path / 'runs' / 'scale' / 'vit_300' / 'seed_2').exists()
  partial = ablate.run_study('scale', str(config_file), str(tmp_path / 'runs'), str(out), seeds=[2],
                             rows=['vit_900'])  # A new seed for one row only: the table has that row.
  assert [line['label'] for line in partial] == ['ViT, 900'] and set(partial[0]['seeds']) == {2}
  with pytest.raises(ValueError, match='Unknown rows'):
    ablate.run_study('scale', str(config_file), str(tmp_path / 'runs'), str(out), [0], rows=['vit_301'])
  with pytest.raises(ValueError, match='Unknown study'):
    ablate.run_study('posemb', str(config_file), str(tmp_path / 'runs'), str(out), [0])
