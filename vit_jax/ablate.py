"""Trains every row of a study (`configs/ablations.py`) for each seed and writes the table of test accuracies.

  python -m vit_jax.ablate --study=posemb --workdir=/tmp/ablate --seeds=0,1 --out=docs/results

Each run is an ordinary `vit_jax.main` run in `<workdir>/<study>/<row>/seed_<n>`: an interrupted study
resumes (a finished run's result is read back, an unfinished one continues from its checkpoint). Writes
`<out>/<study>.json` and `<out>/<study>.md`, and for studies whose rows name a `series` `<out>/<study>.png`
(test accuracy against the rows' `train_size`, one line per series, and few-shot accuracy where rows have
it). The host is set up once, as `vit_jax.main` sets it up (`host_cpu.setup`), so `--set=cpu_devices=N`
applies to every row.
"""
import json
import os
import re
import time
from typing import Dict, List, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from vit_jax import config_lib
from vit_jax import errors
from vit_jax import fewshot as fewshot_lib
from vit_jax import host_cpu
from vit_jax import models
from vit_jax import paths

DEFAULT_STUDIES = os.path.join(os.path.dirname(__file__), '..', 'configs', 'ablations.py')


def define_flags() -> None:
  """The command line; defined only when run as a program, so that importing this module as a library next
  to `vit_jax.main` (which has --config and --workdir too) does not clash."""
  flags.DEFINE_string('study', None, 'A study of the config file (a key of its STUDIES, e.g. posemb, classifier, '
                      'data_scale, masked_patches, transfer, upstream_scale).')
  flags.DEFINE_string('config', DEFAULT_STUDIES, 'Config file with get_config() (the base) and STUDIES (the rows).')
  flags.DEFINE_string('workdir', None, 'Where the runs go (one workdir per row and seed).')
  flags.DEFINE_string('out', None, 'Where the table (and plot) go; default: the workdir.')
  flags.DEFINE_list('seeds', ['0'], 'Seeds; each row is trained once per seed.')
  flags.DEFINE_list('rows', None, 'Train only these rows, by slug (their workdir names, e.g. gap_lr_1e_3); '
                    'finished runs of the others are still read into the table.')
  flags.DEFINE_multi_string('set', [], 'Extra field=value for every row, e.g. --set=total_steps=100.')
  flags.mark_flags_as_required(['study', 'workdir'])


# Row keys that describe the row for the plot instead of setting a config field.
PLOT_KEYS = ('series', 'train_size', 'x_label')
# A row key that is not a config field: True scores the freshly initialised model (its few-shot accuracy, the
# baseline of pretraining) instead of training it.
UNTRAINED = 'untrained'


def slug(label: str) -> str:
  return re.sub(r'[^a-z0-9]+', '_', label.lower()).strip('_')


def _parse_value(text: str):
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


RESULT_FILE = 'ablate_result.json'


def finished_result(study_dir: str, label: str, seed: int, row: dict):
  """The recorded result of a finished run of this row and seed, or None. How the row is drawn (PLOT_KEYS)
  is taken from the row as it is now: it describes the result, it did not make it."""
  path = paths.join(study_dir, slug(label), f'seed_{seed}', RESULT_FILE)
  if not paths.exists(path):
    return None
  result = {k: v for k, v in json.loads(paths.read_text(path)).items() if k not in PLOT_KEYS}
  return {**result, **{k: row[k] for k in PLOT_KEYS if k in row}}


def row_config(base, row: dict, seed: int, study_dir: str):
  """The config of one row and seed: the base with the row's fields (and the seed) set."""
  fields = {k: v.format(study_dir=study_dir, seed=seed) if isinstance(v, str) else v
            for k, v in row.items() if k not in (*PLOT_KEYS, UNTRAINED)}
  return config_lib.override(base, {**fields, 'seed': seed})


def load_study(study: str, config_path: str, extra: dict = None):
  """The base config (with `extra` fields set) and the rows of a study; every row's config is validated
  here, so a bad row fails before the first one trains."""
  module = config_lib.load_config_module(config_path)
  if study not in module.STUDIES:
    raise errors.ConfigError(f'Unknown study {study!r}; {config_path} has {", ".join(module.STUDIES)}.')
  base = config_lib.override(module.get_config(), extra or {})
  table = module.STUDIES[study]
  for label, row in table.items():
    config = row_config(base, row, 0, '')
    try:
      config_lib.validate(config)
    except errors.ConfigError as e:
      raise errors.ConfigError(f'Row {label!r} of study {study!r}: {e}') from None
    if config.cpu_devices != base.cpu_devices:
      raise errors.ConfigError(f'Row {label!r} of study {study!r} sets cpu_devices, which is set once per process: '
                               'set it for the whole study with --set=cpu_devices=N.')
  return base, table


def run_row(base, label: str, row: dict, seed: int, study_dir: str) -> dict:
  """Trains one row with one seed in `<study_dir>/<row>/seed_<seed>`, or reads the result of a finished run
  there. String fields may name other runs of the study: "{study_dir}" and "{seed}" are filled in (e.g.
  `init_from` of a fine-tuning row pointing at a pretraining row run before it)."""
  # TensorFlow comes with these: imported only when something is trained.
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  finished = finished_result(study_dir, label, seed, row)
  if finished is not None:
    return finished
  workdir = paths.join(study_dir, slug(label), f'seed_{seed}')
  result_path = paths.join(workdir, RESULT_FILE)
  config = row_config(base, row, seed, study_dir)
  start = time.perf_counter()
  info = input_pipeline.get_info(input_pipeline.get_builder(config.dataset, config.data_dir), config)
  if row.get(UNTRAINED):
    result = {'accuracy': None, 'step': 0, **untrained_fewshot(config, info)}
  else:
    result = train.train_and_evaluate(config, workdir)
  num_params = models.count_params(models.from_config(config, info.num_classes), config.image_size,
                                   info.channels)
  summary = {'label': label, 'seed': seed, 'accuracy': result['accuracy'], 'steps': result['step'],
             'wall_s': round(time.perf_counter() - start, 1), 'params': num_params,
             'objective': config.objective, 'fewshot': {k: v for k, v in result.items() if k.startswith('fewshot/')},
             **{k: row[k] for k in PLOT_KEYS if k in row}}
  paths.write_text(result_path, json.dumps(summary))
  return summary


def untrained_fewshot(config, info) -> dict:
  """Few-shot accuracies of the model as initialised with the config's seed (nothing trained)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import sharding  # pylint: disable=g-import-not-at-top
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(config.mesh)
  run = train.setup(config, mesh, info.num_classes, train.total_steps(config, info.num_train_examples),
                    info.channels)
  params = run.init_state(jax.random.PRNGKey(config.seed)).params
  return fewshot_lib.scalars(fewshot_lib.Evaluator(config, run.model, mesh, info.channels)(params))


def summarise(results: List[dict]) -> List[dict]:
  """One line per row: mean and spread of the accuracy over seeds, in the rows' order."""
  by_label: Dict[str, List[dict]] = {}
  for result in results:
    by_label.setdefault(result['label'], []).append(result)
  lines = []
  for label, runs in by_label.items():
    trained = runs[0]['accuracy'] is not None
    accuracies = np.array([r['accuracy'] if trained else np.nan for r in runs])
    fewshot = {}
    for key in runs[0].get('fewshot', {}):
      if not key.endswith('_std'):
        values = np.array([r['fewshot'][key] for r in runs])
        fewshot[key] = {'mean': float(values.mean()), 'std': float(values.std(ddof=1)) if len(runs) > 1 else None}
    lines.append({'label': label, 'mean': float(accuracies.mean()) if trained else None,
                  'std': float(accuracies.std(ddof=1)) if len(runs) > 1 and trained else None,
                  'fewshot': fewshot,
                  'seeds': {r['seed']: r['accuracy'] for r in runs if trained}, 'params': runs[0]['params'],
                  'wall_s': float(np.mean([r['wall_s'] for r in runs])), 'objective': runs[0].get('objective'),
                  **{k: runs[0][k] for k in PLOT_KEYS if k in runs[0]}})
  return lines


def _percent(mean, std) -> str:
  if mean is None:
    return '-'
  return f'{100 * mean:.2f}%' + (f' ± {100 * std:.2f}' if std is not None else '')


def markdown_table(study: str, lines: List[dict], command: str) -> str:
  seeds = sorted({seed for line in lines for seed in line['seeds']})
  fewshot_keys = list(dict.fromkeys(key for line in lines for key in line.get('fewshot', {})))
  fewshot_names = [f'{task} {k}-shot' for task, k in map(fewshot_lib.parse_scalar_name, fewshot_keys)]
  header = ['row', 'test accuracy (mean)', *[f'seed {s}' for s in seeds], *fewshot_names, 'parameters',
            'wall per run']
  out = [f'Study `{study}`: `{command}`', '', '| ' + ' | '.join(header) + ' |',
         '|' + '---|' * len(header)]
  for line in lines:
    label = line['label'] + (' (colour accuracy of masked patches)' if line['objective'] == 'masked_patches'
                             else '')
    fewshot = line.get('fewshot', {})
    cells = [label, _percent(line['mean'], line['std']),
             *[f'{100 * line["seeds"][s]:.2f}%' if s in line['seeds'] else '' for s in seeds],
             *[_percent(fewshot[k]['mean'], fewshot[k]['std']) if k in fewshot else '' for k in fewshot_keys],
             f'{line["params"]:,}', f'{line["wall_s"]:.0f} s']
    out.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(out) + '\n'


FIGURE_SHOTS = 5  # The paper's Fig. 4 plots 5-shot linear accuracy against the pretraining data.


def plot_series(lines: List[dict], path: str) -> None:
  """Test accuracy against `train_size`, one line per `series` (rows without a series are not drawn); where
  rows with a `train_size` have few-shot results (the upstream runs of a transfer study), a second panel
  draws each task's FIGURE_SHOTS-shot accuracy against the same axis. Error bars span one standard deviation
  over seeds where there are several."""
  series_lines = [line for line in lines if 'series' in line]
  panels = [('test accuracy (%)', {series: [(line['train_size'], line['mean'], line['std'])
                                            for line in series_lines if line['series'] == series]
                                   for series in dict.fromkeys(line['series'] for line in series_lines)})]
  shots = {}
  for line in lines:
    for key, value in line.get('fewshot', {}).items():
      task, k = fewshot_lib.parse_scalar_name(key)
      if 'train_size' in line and k == FIGURE_SHOTS:
        shots.setdefault(task.removeprefix('embedded_'), []).append(
            (line['train_size'], value['mean'], value['std']))
  if shots:
    panels.append((f'{FIGURE_SHOTS}-shot linear accuracy (%)', shots))
  sizes = sorted({line['train_size'] for line in lines if 'train_size' in line})
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
  for axis, (y_label, curves) in zip(axes[0], panels):
    for name, points in curves.items():
      points = sorted(points)
      axis.errorbar([p[0] for p in points], [100 * p[1] for p in points],
                    yerr=[100 * (p[2] or 0.0) for p in points], marker='o', capsize=3, label=name)
    axis.set_xscale('log')
    axis.set_xticks(sizes, [f'{size:,}' for size in sizes])
    axis.minorticks_off()
    axis.set_xlabel(series_lines[0].get('x_label', 'training images'))
    axis.set_ylabel(y_label)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize='small')
  figure.tight_layout()
  with paths.atomic_writer(path) as f:
    figure.savefig(f, format='png', dpi=120)
  plt.close(figure)


def run_study(study: str, config_path: str, workdir: str, out: str, seeds: Sequence[int],
              rows: Sequence[str] = None, extra: dict = None) -> List[dict]:
  base, table = load_study(study, config_path, extra)
  unknown = set(rows or ()) - {slug(label) for label in table}
  if unknown:
    raise errors.ConfigError(f'Unknown rows {sorted(unknown)} in study {study!r}; it has '
                             f'{[slug(label) for label in table]}.')
  results = []
  for label, row in table.items():
    for seed in seeds:
      if rows and slug(label) not in rows:
        # Not to be trained now; a finished run of it still belongs in the table.
        finished = finished_result(paths.join(workdir, study), label, seed, row)
        if finished is not None:
          results.append(finished)
        continue
      logging.info('Study %s: %s, seed %d.', study, label, seed)
      results.append(run_row(base, label, row, seed, paths.join(workdir, study)))
      print(f'{study} | {label} | seed {seed}: test accuracy {_percent(results[-1]["accuracy"], None)} '
            f'({results[-1]["wall_s"]:.0f} s)', flush=True)
  lines = summarise(results)
  command = ' '.join(['python -m vit_jax.ablate', f'--study={study}', f'--seeds={",".join(map(str, seeds))}',
                      *([f'--rows={",".join(rows)}'] if rows else []),
                      *[f'--set={k}={json.dumps(v)}' for k, v in (extra or {}).items()]])
  paths.write_text(paths.join(out, f'{study}.json'),
                   json.dumps({'study': study, 'command': command, 'runs': results, 'rows': lines}, indent=1))
  paths.write_text(paths.join(out, f'{study}.md'), markdown_table(study, lines, command))
  if any('series' in line for line in lines):
    plot_series(lines, paths.join(out, f'{study}.png'))
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  extra = {}
  for item in args.set:
    key, sep, value = item.partition('=')
    if not sep:
      raise app.UsageError(f'--set takes field=value, got {item!r}.')
    extra[key] = _parse_value(value)
  base, _ = load_study(args.study, args.config, extra)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  errors.quiet_library_logs()
  host_cpu.setup(base)  # As vit_jax.main sets up its host: every row runs in this process.
  lines = run_study(args.study, args.config, args.workdir, args.out or args.workdir,
                    [int(s) for s in args.seeds], args.rows, extra)
  for line in lines:
    print(f'{line["label"]}: {_percent(line["mean"], line["std"])}', flush=True)


if __name__ == '__main__':
  define_flags()
  errors.run(main)
