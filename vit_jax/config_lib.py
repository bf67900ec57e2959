"""The fields every config has, with defaults; files in `configs/` set what differs, like rows of a table.

Every field exists in every config, so any of them can be overridden from the command line
(`--config.batch_size=64`, `--config.model.name=ViT-S/16`, `--config.model.num_layers=2`).
"""
import importlib.metadata
import importlib.util
import json
import os
import subprocess

from absl import logging
import ml_collections
from ml_collections import config_dict

from vit_jax import errors
from vit_jax import paths


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data: any tfds dataset present in `data_dir` (None: tfds' default, $TFDS_DATA_DIR or
  # ~/tensorflow_datasets), or one of the embedded ones (`embedded_fashion_mnist`, `embedded_digits`).
  config.dataset = 'imagenet2012'
  config.data_dir = config_dict.placeholder(str)
  config.train_split = 'train'
  config.eval_split = 'validation'
  config.image_size = 224
  config.cache_data = False  # Keep decoded images in memory (small datasets only).
  config.shuffle_buffer = 50_000
  config.pp = ml_collections.ConfigDict(dict(
      inception_crop=True,  # The paper's training augmentation on ImageNet.
      crop_min_area=0.05,
      flip=True,
      # Decode only the crop window of a JPEG (the same crop, less work: BENCHMARKS.md "Input pipeline").
      decode_and_crop=True,
  ))

  # Model: a registry name ("ViT-B/16", "R50+ViT-B/16", "ViT-mu/4", ...) and optional overrides.
  config.model = ml_collections.ConfigDict(dict(
      name='ViT-B/16',
      classifier='token',  # 'token' ([CLS]) or 'gap'.
      posemb='learn_1d',  # 'learn_1d', 'learn_2d', 'sincos_2d', 'relative' or 'none'.
      representation_size=config_dict.placeholder(int),  # The pre-logits layer; None: no such layer.
      dropout_rate=0.0,
      attention_dropout_rate=0.0,
      patch_size=config_dict.placeholder(int),
      hidden_size=config_dict.placeholder(int),
      mlp_dim=config_dict.placeholder(int),
      num_heads=config_dict.placeholder(int),
      num_layers=config_dict.placeholder(int),
      resnet_layers=config_dict.placeholder(tuple),  # Hybrid stem: units per ResNet stage.
      resnet_width=config_dict.placeholder(int),
      conv_stem=config_dict.placeholder(tuple),  # Channels of 3x3 convolutions before the patch embedding.
      remat=False,  # Recompute activations in the backward pass: less memory, ~1/3 more compute.
      scan=False,  # One nn.scan over the layers: shorter compiles for deep models.
  ))
  config.dtype = 'float32'  # 'bfloat16': activations and matmuls in bf16, weights and optimizer in fp32.

  # Devices: a (data, fsdp) mesh over all devices of all processes; -1 takes what the other axis leaves.
  # The batch is split over both axes; arrays of at least `min_shard_size` elements (the kernels) are split
  # along the fsdp axis, the rest is replicated.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, min_shard_size=2**14))
  # Runs on CPUs only: split each process's CPU into this many JAX devices (None: one; `host_cpu.setup`).
  # One device is the default: it needs no collective, and its steps run on the calling thread (BENCHMARKS.md
  # compares the two). A device count in XLA_FLAGS (--xla_force_host_platform_device_count) wins over it.
  config.cpu_devices = config_dict.placeholder(int)
  # Runs on CPUs only: the library of the compiled steps' matmuls. 'onednn': each dot handed to oneDNN (faster
  # at ViT's shapes, BENCHMARKS.md "CPU dot kernel"); 'xla': XLA:CPU's default dot (YNNPACK/Eigen).
  config.cpu_matmul = 'onednn'
  # Compiled steps kept for the next run (`compilation_cache.py`): 'auto' beside the workdir, '' off, or a
  # folder (local or gs://) that runs may share.
  config.compilation_cache_dir = 'auto'

  # Fine-tuning: start from a published-layout .npz or a vit_jax workdir instead of random weights (only when
  # the workdir has no checkpoint yet; a restart resumes as usual). The head is re-initialised unless
  # `keep_head` and the class count matches; position embeddings are resized to the new resolution.
  config.init_from = config_dict.placeholder(str)
  config.keep_head = False

  # What to learn: 'classification' (labels), or 'masked_patches': self-supervised masked patch prediction
  # (paper Sec. 4.6; labels unused, the eval metric is the accuracy of the predicted patch colours).
  config.objective = 'classification'
  config.masked_patches = ml_collections.ConfigDict(dict(
      corrupt_fraction=0.5,  # Patches corrupted per image; of those:
      mask_prob=0.8,  # replaced by the learned [mask] embedding,
      random_prob=0.1,  # replaced by a random other patch's embedding (the rest stay as they are).
  ))

  # Few-shot linear evaluation of the representation (vit_jax.fewshot) during training, on these tfds tasks
  # (e.g. ('embedded_mnist', 'embedded_digits')), every `every_steps` steps (None: at the end only).
  config.fewshot = ml_collections.ConfigDict(dict(
      tasks=(),
      shots=(1, 5, 10, 25),  # Training examples per class.
      draws=3,  # Seeded draws of the shots, averaged.
      seed=0,
      pool=1000,  # The shots come from the task's first `pool` training examples (VTAB-1k-like).
      max_test=config_dict.placeholder(int),  # Test examples scored (None: the whole test split).
      # Regularisation of the least-squares fit (features centred, scaled to unit mean squared norm): each
      # draw takes the one that scores best on the pool's examples it did not draw.
      l2_regs=(1e-3, 1e-2, 0.1, 1.0, 10.0),
      batch_size=256,  # Images per feature-extraction call (a multiple of the device count).
      every_steps=config_dict.placeholder(int),
  ))

  # Optimisation. `total_steps` wins over `num_epochs` when both are set.
  config.batch_size = 4096
  config.num_epochs = config_dict.placeholder(float)
  config.total_steps = config_dict.placeholder(int)
  config.optimizer = 'adam'  # 'adam' (pretraining) or 'sgd' (fine-tuning, with momentum).
  config.lr = 1e-3
  config.b1 = 0.9
  config.b2 = 0.999
  config.momentum = 0.9
  config.weight_decay = 0.1  # Decoupled (AdamW), on kernels only; scaled by the learning rate schedule.
  config.grad_clip_norm = 1.0  # Global norm; 0 or None turns clipping off.
  config.schedule = 'linear'  # 'linear' or 'cosine' decay after warmup.
  config.warmup_steps = 10_000
  config.label_smoothing = 0.0
  config.accum_steps = 1  # Gradient accumulation: the batch is processed in this many micro-batches.
  # Polyak averaging: evaluate (and export) an exponential moving average of the parameters as well; 0 turns
  # it off. The paper used 0.9999 when fine-tuning ViT-L/16 at 512px. Costs one more copy of the parameters.
  config.ema_decay = 0.0

  # Book-keeping.
  config.log_every_steps = 100
  config.eval_every_steps = 5_000
  config.checkpoint_every_steps = 1_000
  config.keep_checkpoints = 3
  # An object-store workdir (gs://) that stops answering: the run waits this long for it (saying so), then
  # stops; a rerun resumes from the newest committed checkpoint (`storage.py`).
  config.storage_patience_minutes = 30.0
  # (first, last): a profiler trace of these steps, for TensorBoard's Profile tab (<workdir>/plugins/profile).
  # Start after the first step (compilation) and trace a few: e.g. --config.profile_steps='(10, 14)'.
  config.profile_steps = ()
  config.eval_batch_size = config_dict.placeholder(int)  # None: same as batch_size.
  return config


def load_config_module(path: str):
  """A config file as a Python module (its `get_config()` and any tables it defines, e.g. `STUDIES`)."""
  spec = importlib.util.spec_from_file_location(f'vit_jax_config_{abs(hash(path))}', path)
  if spec is None or not os.path.exists(path):
    raise errors.ConfigError(f'Config file {path!r} not found.')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """The config of `path` or `path:arg` (`get_config()` or `get_config(arg)`), as `--config` loads it."""
  path, sep, arg = path.partition(':') if not os.path.exists(path) else (path, '', '')
  module = load_config_module(path)
  return module.get_config(arg) if sep else module.get_config()


# The values some fields take (the names are checked by `validate` before anything starts).
OBJECTIVES = ('classification', 'masked_patches')
OPTIMIZERS = ('adam', 'sgd')
SCHEDULES = ('linear', 'cosine')
DTYPES = ('float32', 'bfloat16')
CPU_MATMULS = ('onednn', 'xla')
CLASSIFIERS = ('token', 'gap')
# 'relative': no absolute embedding; each attention layer adds a learned bias per head and 2-D offset between
# the query and key patches to its logits (paper Appendix D.4).
POSEMB_KINDS = ('learn_1d', 'learn_2d', 'sincos_2d', 'relative', 'none')


def warmup_problem(warmup_steps: int, num_steps: int) -> str:
  return (f'config.warmup_steps={warmup_steps} is not below the {num_steps} training steps: the learning rate '
          f'would never reach config.lr. Set --config.warmup_steps below {num_steps} (the paper warms up for '
          f'10k of 90k+ steps).')


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks what the config alone decides, before any JAX or TensorFlow work: a bad setting fails at once
  with a message naming the field and the fix. (What depends on devices, data or the model is checked where
  it is known: batch vs devices in `sharding`, image vs patch size in `models`.)"""
  problems = []

  def check(ok: bool, message: str) -> None:
    if not ok:
      problems.append(message)

  for field, choices in (('objective', OBJECTIVES), ('optimizer', OPTIMIZERS), ('schedule', SCHEDULES),
                         ('dtype', DTYPES), ('cpu_matmul', CPU_MATMULS)):
    check(config[field] in choices, f'Unknown {field} {config[field]!r}: choose one of {", ".join(choices)} '
                                    f'(--config.{field}=...).')
  check(config.lr is not None and config.lr > 0,
        f'config.lr={config.lr}: the learning rate must be positive (a negative one ascends the loss).')
  check(0.0 <= config.ema_decay < 1.0, f'config.ema_decay={config.ema_decay} must be in [0, 1): 0 turns the '
                                       'moving average off, the paper used 0.9999.')
  check(bool(config.total_steps) or bool(config.num_epochs), 'Set --config.total_steps or --config.num_epochs.')
  for field in ('total_steps', 'num_epochs'):
    check(config[field] is None or config[field] > 0, f'config.{field}={config[field]} must be positive.')
  if config.total_steps and config.total_steps > 0:  # Wins over num_epochs; with epochs, `train` checks.
    check(config.warmup_steps < config.total_steps, warmup_problem(config.warmup_steps, config.total_steps))
  check(config.batch_size > 0, f'config.batch_size={config.batch_size} must be positive.')
  check(config.eval_batch_size is None or config.eval_batch_size > 0,
        f'config.eval_batch_size={config.eval_batch_size} must be positive (or None: the batch size).')
  check(config.image_size > 0, f'config.image_size={config.image_size} must be positive.')
  check(config.accum_steps >= 1 and config.batch_size % config.accum_steps == 0,
        f'config.accum_steps={config.accum_steps} must be a positive divisor of the batch size '
        f'{config.batch_size}.')
  check(config.cpu_devices is None or config.cpu_devices >= 1,
        f'config.cpu_devices={config.cpu_devices}: give a positive device count, or None for one.')
  steps = tuple(config.profile_steps)
  check(not steps or (len(steps) == 2 and 1 <= steps[0] <= steps[1]),
        f'config.profile_steps={steps}: give (first, last) with 1 <= first <= last, or () for no trace.')
  fewshot = config.fewshot
  check(all(k >= 1 for k in fewshot.shots) and fewshot.draws >= 1 and len(fewshot.l2_regs) >= 1 and
        all(l2 > 0 for l2 in fewshot.l2_regs) and (fewshot.every_steps is None or fewshot.every_steps >= 1),
        f'config.fewshot: shots {tuple(fewshot.shots)} and draws {fewshot.draws} must be at least 1, l2_regs '
        f'{tuple(fewshot.l2_regs)} positive, every_steps {fewshot.every_steps} at least 1 (or None: at the end).')
  for field in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
    check(config[field] >= 1, f'config.{field}={config[field]} must be at least 1.')
  check(config.storage_patience_minutes >= 0, f'config.storage_patience_minutes={config.storage_patience_minutes} '
                                             'must not be negative (0: stop as soon as storage fails).')
  check(config.warmup_steps >= 0, f'config.warmup_steps={config.warmup_steps} must not be negative.')
  check(str(config.compilation_cache_dir).lower() not in ('none', 'off', 'false', '0'),
        f'config.compilation_cache_dir={config.compilation_cache_dir!r} would be a folder of that name: '
        "--config.compilation_cache_dir='' turns the cache off ('auto': beside the workdir).")
  for field in ('b1', 'b2', 'momentum', 'label_smoothing', 'model.dropout_rate', 'model.attention_dropout_rate'):
    value = config[field]  # ConfigDict reads dotted fields ('model.dropout_rate') itself.
    check(value is not None and 0.0 <= value < 1.0, f'config.{field}={value} must be in [0, 1).')
  check(config.weight_decay is not None and config.weight_decay >= 0,
        f'config.weight_decay={config.weight_decay} must not be negative (0 turns it off).')
  check(config.grad_clip_norm is None or config.grad_clip_norm >= 0,
        f'config.grad_clip_norm={config.grad_clip_norm} must not be negative (0 or None turns clipping off).')
  for field, choices in (('classifier', CLASSIFIERS), ('posemb', POSEMB_KINDS)):
    check(config.model[field] in choices, f'Unknown model.{field} {config.model[field]!r}: choose one of '
                                          f'{", ".join(choices)} (--config.model.{field}=...).')
  check(config.init_from != '', 'This config fine-tunes pretrained weights: set --config.init_from to a '
                                'published-layout .npz (e.g. ViT-B_16.npz) or to the workdir of a vit_jax run.')
  if config.objective == 'masked_patches':
    check(not config.init_from, 'Masked patch prediction pretrains from scratch: unset --config.init_from, or '
                                'fine-tune with --config.objective=classification.')
    settings = config.masked_patches
    check(0.0 < settings.corrupt_fraction <= 1.0 and settings.mask_prob >= 0 and settings.random_prob >= 0
          and settings.mask_prob + settings.random_prob <= 1.0,
          f'config.masked_patches={settings.to_dict()}: corrupt_fraction must be in (0, 1], mask_prob and '
          'random_prob non-negative with a sum of at most 1.')
  if problems:
    raise errors.ConfigError('Invalid config:\n  ' + '\n  '.join(problems))


def override(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted fields replaced (`{'model.posemb': 'none', 'lr': 3e-4}`), as the
  command line's `--config.model.posemb=none` would; unknown fields are an error."""
  config = config.copy_and_resolve_references()
  for dotted, value in overrides.items():
    *parents, name = dotted.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    if name not in node:
      raise KeyError(f'Unknown config field {dotted!r}.')
    node[name] = value
  return config


WORKDIR_CONFIG = 'config.json'


WORKDIR_CODE = 'code.json'


def code_version() -> str:
  """The code running: `VIT_JAX_COMMIT` (set by the launchers that ship a commit), else the commit of the
  checkout this package runs from (marked when it has uncommitted changes), else the package version."""
  if os.environ.get('VIT_JAX_COMMIT'):
    return os.environ['VIT_JAX_COMMIT']
  checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    git = lambda *args: subprocess.run(['git', '-C', checkout, *args], capture_output=True, text=True, timeout=10,
                                       check=True).stdout.strip()
    commit = git('rev-parse', '--short=12', 'HEAD')
    return commit + (' with uncommitted changes' if git('status', '--porcelain', '--untracked-files=no') else '')
  except (OSError, subprocess.SubprocessError):
    return f'vit_jax {importlib.metadata.version("vit_jax")} (not a git checkout)'


def record_code_version(workdir: str, resuming: bool) -> None:
  """Writes the code version into the workdir; a run resuming checkpoints written by other code says so (the
  config check cannot see a change of code)."""
  path, current = paths.join(workdir, WORKDIR_CODE), code_version()
  if resuming and paths.exists(path):
    try:
      recorded = json.loads(paths.read_text(path)).get('code')
    except (ValueError, AttributeError):
      recorded = None
    if recorded and recorded != current:
      logging.warning('The checkpoints in %s were written by code %s; this run is code %s: it continues them '
                      'under other code.', workdir, recorded, current)
  paths.write_text(path, json.dumps({'code': current}))


def save_workdir_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Records the run's config next to its checkpoints, so tools can rebuild the model from the workdir.
  Written whole or not at all: a crash leaves the old record or the new one."""
  paths.write_text(paths.join(workdir, WORKDIR_CONFIG), config.to_json_best_effort(indent=1))


# What a resumed run may change: how long it runs (extending a finished run), how often it logs, evaluates,
# checkpoints, profiles and few-shot evaluates, where it reads the data, how it lays out devices, which CPU
# matmul library runs, where compiled executables are cached, how long it waits for storage, and how a step
# is computed when the update stays the same (micro-batches and recomputed activations: what a move to a
# slice with less memory per device needs). Anything else would silently continue the recorded run under other
# settings. A dotted name allows that one field of a group.
RESUMABLE_CHANGES = ('total_steps', 'num_epochs', 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
                     'profile_steps', 'data_dir', 'mesh', 'cpu_devices', 'cpu_matmul', 'eval_batch_size',
                     'fewshot', 'compilation_cache_dir', 'storage_patience_minutes', 'accum_steps', 'model.remat')


def _may_change_on_resume(key: str) -> bool:
  return any(key == allowed or key.startswith(allowed + '.') for allowed in RESUMABLE_CHANGES)


def _flat(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = value
  return flat


def check_resumable(config: ml_collections.ConfigDict, workdir: str, adopt: bool = False) -> None:
  """Refuses to resume the checkpoints in `workdir` under a config that differs from the one they were made
  with, beyond RESUMABLE_CHANGES. Settings unknown to either side (added or removed since) are not compared.
  Without a readable record there is nothing to compare: refused, unless `adopt` (the user vouches that this
  config continues the run; it becomes the record)."""
  try:
    recorded = _flat(_read_workdir_json(workdir))
  except errors.WorkdirError as e:
    if adopt:
      logging.warning('%s; adopting the given config as the run\'s record (--adopt_config).', e)
      return
    raise errors.WorkdirError(
        f'{e}, but {workdir} holds checkpoints: without that record nothing shows that this config continues '
        'their run. If it does, rerun with --adopt_config (the config given becomes the record); otherwise give '
        'a new --workdir.') from None
  current = _flat(json.loads(config.to_json_best_effort()))
  changed = sorted(key for key in recorded.keys() & current.keys()
                   if recorded[key] != current[key] and not _may_change_on_resume(key))
  if changed:
    details = '; '.join(f'{key}: {recorded[key]!r} -> {current[key]!r}' for key in changed)
    raise errors.ConfigError(f'{workdir} holds checkpoints of a run with another config ({details}); resuming '
                             f'would continue that run under these settings. Give a new --workdir, or delete '
                             f'{workdir} to start over.')


def _read_workdir_json(workdir: str) -> dict:
  """The recorded config as plain JSON (lists stay lists: what `check_resumable` compares)."""
  path = paths.join(workdir, WORKDIR_CONFIG)
  try:
    if not paths.exists(path):  # Object stores raise their own kinds of "not found".
      raise FileNotFoundError(path)
    record = json.loads(paths.read_text(path))
  except FileNotFoundError:
    raise errors.WorkdirError(f'{path} is missing') from None
  except (OSError, ValueError) as e:
    raise errors.WorkdirError(f'{path} is unreadable ({type(e).__name__}: {e})') from None
  if not isinstance(record, dict):
    raise errors.WorkdirError(f'{path} is unreadable (not a JSON object)')
  return record


def _fill_missing(recorded: dict, defaults: dict) -> dict:
  for key, value in defaults.items():
    if key not in recorded:
      recorded[key] = value
    elif isinstance(value, dict) and isinstance(recorded[key], dict):
      _fill_missing(recorded[key], value)
  return recorded


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a `vit_jax.main` run recorded in its workdir; fields added to the base config since the run
  was recorded take their defaults, so readers (analyze, fewshot, export) see every field."""
  try:
    recorded = _read_workdir_json(workdir)
  except errors.WorkdirError as e:
    raise errors.WorkdirError(f'{e}: is {workdir!r} the workdir of a vit_jax.main run?') from None
  # JSON has no tuples; model fields must be hashable (converted before the ConfigDict, which keeps a
  # field's first type).
  recorded['model'] = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.get('model', {}).items()}
  return ml_collections.ConfigDict(_fill_missing(recorded, base_config().to_dict()))
