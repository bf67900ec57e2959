"""Training pieces: optimizer and schedule, train state, and `train_step` / `eval_step` as plain functions.

The steps are jitted over a device `Mesh` with `data` and `fsdp` axes: the batch is split over both, large
parameters and their optimizer state along `fsdp`. The same code runs on one CPU device, on simulated devices
and on a pod.
"""
import collections
import ctypes
import dataclasses
import os
import re
import time
from typing import Any, Callable, Dict, Iterator, Tuple

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vit_jax import checkpoints
from vit_jax import config_lib
from vit_jax import models
from vit_jax import mpp

OBJECTIVES = ('classification', 'masked_patches')


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  # Polyak (exponential moving) average of `params` for evaluation (`config.ema_decay` > 0), else None.
  ema_params: Any = None


def total_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  if config.total_steps:
    return int(config.total_steps)
  if not config.num_epochs:
    raise ValueError('Set --config.total_steps or --config.num_epochs.')
  return max(1, int(config.num_epochs * num_train_examples / config.batch_size))


def learning_rate_schedule(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then linear or cosine decay to 0 at `num_steps` (paper Appendix B.1)."""
  warmup = min(config.warmup_steps, num_steps - 1)
  decay_steps = max(1, num_steps - warmup)
  if config.schedule == 'linear':
    decay = optax.linear_schedule(config.lr, 0.0, decay_steps)
  elif config.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(config.lr, decay_steps)
  else:
    raise ValueError(f'Unknown schedule {config.schedule!r}; choose "linear" or "cosine".')
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), decay], [warmup])


def _decay_mask(params):
  """Weight decay on matrices (kernels, embeddings) only, not on biases and norm scales."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(config: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  """Adam with decoupled weight decay for pretraining, SGD with momentum for fine-tuning (paper Sec. 4.1)."""
  schedule = learning_rate_schedule(config, num_steps)
  if config.optimizer == 'adam':
    optimizer = optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
                            mask=_decay_mask)
  elif config.optimizer == 'sgd':
    optimizer = optax.sgd(schedule, momentum=config.momentum)
    if config.weight_decay:
      optimizer = optax.chain(optax.add_decayed_weights(config.weight_decay, _decay_mask), optimizer)
  else:
    raise ValueError(f'Unknown optimizer {config.optimizer!r}; choose "adam" or "sgd".')
  if config.grad_clip_norm:
    optimizer = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optimizer)
  return optimizer


def init_state(model: nn.Module, optimizer: optax.GradientTransformation, rng: jax.Array,
               image_shape: Tuple[int, ...], ema: bool = False, masked_patches: bool = False) -> TrainState:
  """Fresh parameters; `masked_patches`: those of masked patch prediction ([mask] embedding and colour head
  instead of the classification head)."""
  images = jnp.zeros((1, *image_shape), jnp.float32)
  options = {}
  if masked_patches:
    num_patches = int(np.prod(model.token_grid(image_shape[:2])))
    options['corruption'] = models.PatchCorruption(mask=jnp.zeros((1, num_patches), bool),
                                                   replace_with=jnp.full((1, num_patches), -1))
  params = model.init(rng, images, **options)['params']
  return state_from_params(params, optimizer, ema)


def state_from_params(params: Any, optimizer: optax.GradientTransformation, ema: bool) -> TrainState:
  """Step 0 with these parameters; the moving average, if any, starts at them."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    ema_params=jax.tree.map(jnp.copy, params) if ema else None)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy against (optionally smoothed) one-hot labels."""
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def train_step(state: TrainState, batch: Dict[str, jax.Array], *, model: nn.Module,
               optimizer: optax.GradientTransformation, label_smoothing: float, dropout_key: jax.Array,
               accum_steps: int = 1, ema_decay: float = 0.0,
               mpp_config: ml_collections.ConfigDict = None) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One optimizer update on a global batch; returns the new state and the batch's metrics.

  The loss is the classification cross-entropy, or with `mpp_config` (`config.mpp`) that of masked patch
  prediction on the images alone (labels unused; "accuracy" is then that of the predicted patch colours).

  With `accum_steps` > 1 the batch is processed in that many equal micro-batches whose gradients are
  averaged: the same update as one step on the whole batch, with the activation memory of one micro-batch.
  """
  # Dropout noise is a function of (seed, step) only, so a resumed run draws what an uninterrupted one would.
  step_key = jax.random.fold_in(dropout_key, state.step)

  def loss_fn(params, micro_batch, key):
    if mpp_config is not None:
      noise_key, corruption_key = jax.random.split(key)
      loss, correct, weight = mpp.losses(model, params, micro_batch['image'], corruption_key, mpp_config,
                                         train=True, dropout_rng=noise_key)
      count = jnp.maximum(jnp.sum(weight), 1.0)
      return jnp.sum(loss * weight) / count, jnp.sum(correct * weight) / count
    logits = model.apply({'params': params}, micro_batch['image'], train=True, rngs={'dropout': key})
    loss = jnp.mean(cross_entropy(logits, micro_batch['label'], label_smoothing))
    return loss, jnp.mean(jnp.argmax(logits, -1) == micro_batch['label'])

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (loss, accuracy), grads = grad_fn(state.params, batch, step_key)
  else:
    # Example i * accum_steps + j goes to micro-batch j: every device's contiguous slice of the batch holds
    # an equal share of each micro-batch, so splitting moves no data between devices.
    micro_batches = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(-1, accum_steps, *x.shape[1:]), 0, 1), batch)

    def accumulate(sums, inputs):
      micro_batch, index = inputs
      (loss, accuracy), grads = grad_fn(state.params, micro_batch, jax.random.fold_in(step_key, index))
      return jax.tree.map(jnp.add, sums, (grads, loss, accuracy)), None

    zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros(()), jnp.zeros(()))
    sums, _ = jax.lax.scan(accumulate, zeros, (micro_batches, jnp.arange(accum_steps)))
    grads, loss, accuracy = jax.tree.map(lambda x: x / accum_steps, sums)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = state.ema_params
  if ema_params is not None:
    ema_params = optax.incremental_update(params, ema_params, step_size=1.0 - ema_decay)
  metrics = {'loss': loss, 'accuracy': accuracy, 'grad_norm': optax.tree.norm(grads)}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params), metrics


def eval_step(params: Any, batch: Dict[str, jax.Array], *, model: nn.Module,
              mpp_config: ml_collections.ConfigDict = None) -> Dict[str, jax.Array]:
  """Sums over the batch (padding masked out), so that metrics add up exactly across batches. With
  `mpp_config`: over the corrupted patches (a fixed draw), whose mean colour the model predicts."""
  if mpp_config is not None:
    loss, correct, weight = mpp.losses(model, params, batch['image'], jax.random.PRNGKey(0), mpp_config,
                                       train=False)
    weight = weight * batch['mask'][:, None]
    return {'correct': jnp.sum(correct * weight), 'loss': jnp.sum(loss * weight), 'count': jnp.sum(weight)}
  logits = model.apply({'params': params}, batch['image'], train=False)
  mask = batch['mask']
  return {'correct': jnp.sum((jnp.argmax(logits, -1) == batch['label']) * mask),
          'loss': jnp.sum(cross_entropy(logits, batch['label']) * mask),
          'count': jnp.sum(mask)}


MESH_AXES = ('data', 'fsdp')
BATCH_AXES = MESH_AXES  # The batch is split over every device; fsdp devices share parameters, not data.


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A 2-D (data, fsdp) mesh over every device of every process; -1 takes the devices left over.

  The fsdp axis is innermost, so parameter shards are gathered between neighbouring devices (within a host
  where the fsdp size allows it); the data axis spans hosts.
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  sizes = {name: int(mesh_config.get(name, 1)) for name in MESH_AXES}
  unknown = set(mesh_config.keys()) - set(MESH_AXES) - {'min_shard_size'}
  if unknown:
    raise ValueError(f'Unknown mesh axes {sorted(unknown)} in config.mesh; the axes are {MESH_AXES}.')
  free = [name for name, size in sizes.items() if size == -1]
  fixed = int(np.prod([size for size in sizes.values() if size != -1]))
  if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
    raise ValueError(f'Invalid mesh {sizes}: give each axis a positive size, and -1 to at most one.')
  if free:
    if fixed == 0 or devices.size % fixed:
      raise ValueError(f'The mesh {sizes} does not divide the {devices.size} devices: the fixed axes multiply '
                       f'to {fixed}. Set --config.mesh.* so that their product divides {devices.size}.')
    sizes[free[0]] = devices.size // fixed
  if int(np.prod(list(sizes.values()))) != devices.size:
    raise ValueError(f'The mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices but there are '
                     f'{devices.size}: set --config.mesh.data=-1 to use every device, or sizes that multiply '
                     f'to {devices.size}.')
  return Mesh(devices.reshape([sizes[name] for name in MESH_AXES]), MESH_AXES)


def num_batch_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[name] for name in BATCH_AXES]))


def check_batch_size(batch_size: int, mesh: Mesh, accum_steps: int = 1) -> None:
  """Fails before any compile when the batch cannot be split over the devices (and micro-batches)."""
  shards = num_batch_shards(mesh)
  layout = ' x '.join(f'{name}={mesh.shape[name]}' for name in BATCH_AXES)
  if batch_size % shards:
    raise ValueError(
        f'The batch size {batch_size} is not divisible by the number of devices it is split over '
        f'({shards}: {layout}): set --config.batch_size to a multiple of {shards} (e.g. '
        f'{max(1, batch_size // shards) * shards}).')
  if accum_steps < 1 or batch_size % accum_steps:
    raise ValueError(f'config.accum_steps={accum_steps} does not divide the batch size {batch_size}: use a '
                     f'divisor of it, e.g. {max(d for d in range(1, 9) if batch_size % d == 0)}.')
  if (batch_size // accum_steps) % shards:
    raise ValueError(
        f'The micro-batch {batch_size // accum_steps} (batch {batch_size} / accum_steps {accum_steps}) is not '
        f'divisible by the {shards} devices ({layout}): use a batch size that is a multiple of '
        f'{shards * accum_steps}, or fewer accumulation steps.')


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_sharding(shape: Tuple[int, ...], mesh: Mesh, min_size: int) -> NamedSharding:
  """Splits an array of at least `min_size` elements along its largest dimension that the fsdp axis
  divides; smaller arrays (biases, norms, scalars) and arrays with no such dimension stay replicated."""
  fsdp = mesh.shape['fsdp']
  if fsdp == 1 or int(np.prod(shape)) < min_size:
    return replicated(mesh)
  candidates = [(size, axis) for axis, size in enumerate(shape) if size % fsdp == 0]
  if not candidates:
    return replicated(mesh)
  _, axis = max(candidates)
  spec = [None] * len(shape)
  spec[axis] = 'fsdp'
  return NamedSharding(mesh, P(*spec))


def state_shardings(abstract_state: TrainState, mesh: Mesh, min_size: int) -> TrainState:
  """Shardings of parameters and optimizer state alike (Adam's moments have the parameters' shapes)."""
  return jax.tree.map(lambda x: fsdp_sharding(x.shape, mesh, min_size), abstract_state)


def to_global_batch(local_batch: Dict[str, np.ndarray], mesh: Mesh) -> Dict[str, jax.Array]:
  """Each process's slice of the batch -> one global `jax.Array` per field, split over the devices."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def prefetch_to_mesh(batches: Iterator[Dict[str, np.ndarray]], mesh: Mesh, size: int = 2):
  """Yields global batches already on their devices, `size` ahead: the copy of the next batch overlaps the
  running step (on accelerators steps are dispatched asynchronously), so the devices never wait for the host."""
  queue = collections.deque()
  for batch in batches:
    queue.append(to_global_batch(batch, mesh))
    if len(queue) >= size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def jit_train_step(model, optimizer, config, mesh: Mesh, state_sharding) -> Callable:
  """`train_step` jitted with explicit shardings: state sharded as given, batch split, input state donated."""
  step = lambda state, batch: train_step(state, batch, model=model, optimizer=optimizer,
                                         label_smoothing=config.label_smoothing,
                                         dropout_key=jax.random.PRNGKey(config.seed + 1),
                                         accum_steps=config.accum_steps, ema_decay=config.ema_decay,
                                         mpp_config=mpp_config(config))
  return jax.jit(step, in_shardings=(state_sharding, batch_sharding(mesh)),
                 out_shardings=(state_sharding, replicated(mesh)), donate_argnums=0)


def mpp_config(config: ml_collections.ConfigDict):
  """`config.mpp` when the run pretrains by masked patch prediction, else None (classification)."""
  if config.objective not in OBJECTIVES:
    raise ValueError(f'Unknown objective {config.objective!r}; choose one of {OBJECTIVES}.')
  return config.mpp if config.objective == 'masked_patches' else None


def jit_eval_step(model, mesh: Mesh, params_sharding, config: ml_collections.ConfigDict) -> Callable:
  return jax.jit(lambda params, batch: eval_step(params, batch, model=model, mpp_config=mpp_config(config)),
                 in_shardings=(params_sharding, batch_sharding(mesh)), out_shardings=replicated(mesh))


def abstract_train_inputs(model, optimizer, image_shape, batch_size: int, mesh: Mesh, min_shard_size: int,
                          ema: bool = False, masked_patches: bool = False):
  """Shapes and shardings of the train step's arguments, without materialising a single weight."""
  state = jax.eval_shape(lambda rng: init_state(model, optimizer, rng, image_shape, ema, masked_patches),
                         jax.random.PRNGKey(0))
  shardings = state_shardings(state, mesh, min_shard_size)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  batch = {'image': jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32,
                                         sharding=batch_sharding(mesh)),
           'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch_sharding(mesh))}
  return state, batch


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """Everything a run needs but data and weights."""
  model: nn.Module
  optimizer: optax.GradientTransformation
  image_shape: Tuple[int, int, int]
  ema: bool
  masked_patches: bool  # Pretraining by masked patch prediction (config.objective).
  abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings.
  abstract_batch: Dict[str, jax.ShapeDtypeStruct]
  state_sharding: TrainState
  train_fn: Callable
  eval_fn: Callable

  def init_state(self, rng: jax.Array) -> TrainState:
    """Fresh weights, created directly in their shards (never whole on one device)."""
    init = jax.jit(lambda rng: init_state(self.model, self.optimizer, rng, self.image_shape, self.ema,
                                          self.masked_patches),
                   out_shardings=self.state_sharding)
    return init(rng)


def setup(config: ml_collections.ConfigDict, mesh: Mesh, num_classes: int, num_steps: int,
          channels: int) -> TrainSetup:
  """Model, optimizer, abstract state and jitted steps. Checks run first (batch vs devices and micro-batches,
  image size vs patch size), so bad input fails with a clear message before any compile."""
  check_batch_size(config.batch_size, mesh, config.accum_steps)
  check_batch_size(config.eval_batch_size or config.batch_size, mesh)
  model = models.from_config(config, num_classes)
  optimizer = create_optimizer(config, num_steps)
  image_shape = (config.image_size, config.image_size, channels)
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f'config.ema_decay={config.ema_decay} must be in [0, 1): 0 turns the moving average '
                     f'off, the paper used 0.9999.')
  ema = config.ema_decay > 0
  masked_patches = mpp_config(config) is not None
  if masked_patches and config.init_from:
    raise ValueError('Masked patch prediction pretrains from scratch: unset --config.init_from, or fine-tune '
                     'with --config.objective=classification.')
  # Traces the model: a bad model/image-size combination fails here, with a clear message.
  abstract_state, abstract_batch = abstract_train_inputs(model, optimizer, image_shape, config.batch_size,
                                                         mesh, config.mesh.min_shard_size, ema,
                                                         masked_patches)
  sharding = jax.tree.map(lambda x: x.sharding, abstract_state)
  return TrainSetup(model=model, optimizer=optimizer, image_shape=image_shape, ema=ema,
                    masked_patches=masked_patches, abstract_state=abstract_state,
                    abstract_batch=abstract_batch, state_sharding=sharding,
                    train_fn=jit_train_step(model, optimizer, config, mesh, sharding),
                    eval_fn=jit_eval_step(model, mesh, sharding.params, config))


class ProgressLogger:
  """Logs step, loss, steps/s, images/s and ETA, and writes TensorBoard scalars (process 0 only)."""

  def __init__(self, workdir: str, num_steps: int, batch_size: int, start_step: int):
    self.enabled = jax.process_index() == 0
    self.num_steps, self.batch_size = num_steps, batch_size
    self.last_step, self.last_time = start_step, time.perf_counter()
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (see train_and_evaluate)
    self.summary = tf.summary
    self.writer = tf.summary.create_file_writer(workdir) if self.enabled else None

  def scalars(self, step: int, scalars: Dict[str, float]) -> None:
    if not self.enabled:
      return
    with self.writer.as_default():
      for name, value in scalars.items():
        self.summary.scalar(name, value, step=step)
    self.writer.flush()

  def train_metrics(self, step: int, metrics: Dict[str, float]) -> None:
    now = time.perf_counter()
    steps_per_sec = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    images_per_sec = steps_per_sec * self.batch_size
    eta = (self.num_steps - step) / max(steps_per_sec, 1e-9)
    self.scalars(step, {**{f'train/{k}': v for k, v in metrics.items()},
                        'train/steps_per_sec': steps_per_sec, 'train/images_per_sec': images_per_sec})
    if self.enabled:
      logging.info('step %d/%d  loss %.4f  accuracy %.4f  %.2f steps/s  %.0f images/s  ETA %s', step,
                   self.num_steps, metrics['loss'], metrics['accuracy'], steps_per_sec, images_per_sec,
                   _format_seconds(eta))

  def restart_clock(self, step: int) -> None:
    """Excludes time spent outside training (eval, checkpoints, compilation) from the speed."""
    self.last_step, self.last_time = step, time.perf_counter()


def _format_seconds(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}:{minutes:02d}:{seconds:02d}'


def evaluate(eval_fn: Callable, params: Any, dataset, mesh: Mesh) -> Dict[str, float]:
  totals = None
  for batch in dataset.as_numpy_iterator():
    sums = eval_fn(params, to_global_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.tree.map(lambda x: float(jax.device_get(x)), totals)
  count = totals['count']
  return {'accuracy': totals['correct'] / count, 'loss': totals['loss'] / count,
          'correct': int(totals['correct']), 'count': int(count)}


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """Orbax writes each checkpoint to a temporary folder and renames it when complete: a crash mid-save
  leaves the previous checkpoint as the latest readable one."""
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), options=options)


def init_from_pretrained(run: TrainSetup, config: ml_collections.ConfigDict) -> TrainState:
  """Fine-tuning: a fresh state whose parameters come from `config.init_from` (a published-layout `.npz` or a
  vit_jax workdir), adapted to this model (new zero head, position embeddings resized to the new grid).
  Everything is checked before the state is replaced: a mismatch never leaves a half-loaded model."""
  source = config.init_from
  if os.path.isdir(source):
    pretrained, _ = checkpoints.restore_params(source)
  else:
    pretrained = checkpoints.load_npz(source)
  # Only shapes are needed, and the head the model would initialise is all zeros: build it on the host
  # (reading the fresh sharded parameters back would fail when they span several processes).
  fresh = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), run.abstract_state.params)
  grid = run.model.token_grid((config.image_size, config.image_size))
  params = checkpoints.adapt_to_model(pretrained, fresh, grid, 1 if run.model.classifier == 'token' else 0,
                                      keep_head=config.keep_head)
  new_state = jax.jit(lambda p: state_from_params(p, run.optimizer, run.ema),
                      in_shardings=(run.state_sharding.params,), out_shardings=run.state_sharding)
  logging.info('Initialised from %s (head re-initialised for %d classes, position embeddings for a %dx%d '
               'grid).', source, run.model.num_classes, *grid)
  return new_state(params)


# glibc mallopt parameters (malloc.h); their values are C ints.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_INT_MAX = 2**31 - 1


def keep_host_buffers_mapped() -> bool:
  """On the CPU backend, lets glibc keep freed step buffers mapped for the next step instead of unmapping them.

  XLA:CPU mallocs each step's temporaries as one block (63 MiB for the default at batch 64, 2.2 GiB for
  ViT-B/16 training at batch 8). glibc serves blocks above 32 MiB with a fresh mmap and unmaps them on free, so
  every step faulted all their pages in again: a quarter of the default's CPU time in the kernel, ~1.5 s of
  B/16's 9 s step. Here every block comes from the heap instead (M_MMAP_MAX 0), and the heap keeps up to 2 GiB
  of freed memory at its top (M_TRIM_THRESHOLD, M_TOP_PAD: the int limit of mallopt), so the next step
  reuses the same pages; the peak RSS is unchanged (measured for B/16). The block must be malloc'ed on the
  main thread, whose arena is that heap (a helper thread's arena is made of mmapped heaps of at most
  64 MiB): hence one-device steps without async dispatch (`configure_host_cpu`). Returns whether the setting
  was applied (only on Linux with glibc, for a CPU backend).
  """
  if jax.default_backend() != 'cpu':
    return False  # Device buffers live on the accelerator; leave the host allocator as it is.
  try:
    libc = ctypes.CDLL('libc.so.6')
  except OSError:
    return False  # Not glibc (macOS, musl): nothing to tune.
  return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) and
              libc.mallopt(_M_TOP_PAD, _INT_MAX))


def configure_host_cpu(num_devices) -> None:
  """Sets up JAX's CPU backend before it starts: `config.cpu_devices` splits the CPU into that many devices
  (a device count in XLA_FLAGS wins); accelerator runs are unaffected, their mesh is made of the accelerators.

  With one CPU device, each step runs on the calling thread instead of XLA's dispatch thread (no async
  dispatch). glibc gives every non-main thread its own mmapped arena, too small to keep a step's temporary
  block (63 MiB for the default), so on the dispatch thread each step faulted its pages in afresh; on the main
  thread the block is reused (`keep_host_buffers_mapped`). The default's step on 2 cores, alternating
  runs: 777 and 779 images/s synchronous, 680 and 642 asynchronous. With several devices the partitions run
  on a thread pool anyway, and synchronous dispatch measured slower there (688 vs 838 on 2 devices).
  """
  forced = re.search(r'xla_force_host_platform_device_count=(\d+)', os.environ.get('XLA_FLAGS', ''))
  if num_devices is not None and not forced:
    if num_devices < 1:
      raise ValueError(f'config.cpu_devices={num_devices}: give a positive device count, or None for one.')
    jax.config.update('jax_num_cpu_devices', num_devices)
  if (int(forced.group(1)) if forced else num_devices or 1) == 1:
    jax.config.update('jax_cpu_enable_async_dispatch', False)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Trains from scratch (or resumes from the latest checkpoint in `workdir`), then evaluates."""
  # TensorFlow (tf.data, summaries) is imported only here: the steps above run without it (benchmarks, and
  # processes that use PyTorch, whose triton crashes when loaded after TensorFlow).
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  if config.init_from == '':  # pylint: disable=g-explicit-bool-comparison
    raise ValueError('This config fine-tunes pretrained weights: set --config.init_from to a published-layout '
                     '.npz (e.g. ViT-B_16.npz) or to the workdir of a vit_jax run.')
  mesh = make_mesh(config.mesh)
  keep_host_buffers_mapped()
  builder = input_pipeline.get_builder(config.dataset, config.data_dir)
  info = input_pipeline.get_info(builder, config)
  num_steps = total_steps(config, info.num_train_examples)
  run = setup(config, mesh, info.num_classes, num_steps, info.channels)
  manager = checkpoint_manager(workdir, config)
  latest = manager.latest_step()
  if latest is not None:
    config_lib.check_resumable(config, workdir)
  if jax.process_index() == 0:
    config_lib.save_workdir_config(config, workdir)  # After the check: it compares with the recorded config.
  if latest is not None:
    # Collective: every process restores its own shards of the state.
    state = manager.restore(latest, args=ocp.args.StandardRestore(run.abstract_state))
    logging.info('Resumed from the checkpoint of step %d in %s.', latest, manager.directory)
  elif config.init_from:
    state = init_from_pretrained(run, config)
  else:
    state = run.init_state(jax.random.PRNGKey(config.seed))
  start_step = int(jax.device_get(state.step))
  if jax.process_index() == 0:
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info('Model %s: %s parameters; %d steps of batch %d on %d devices (mesh %s, %d processes).',
                 config.model.name, f'{num_params:,}', num_steps, config.batch_size, mesh.devices.size,
                 dict(mesh.shape), jax.process_count())

  train_fn, eval_fn = run.train_fn, run.eval_fn
  eval_batch_size = config.eval_batch_size or config.batch_size
  local_eval_batch = input_pipeline.process_batch_size(eval_batch_size)
  eval_ds = input_pipeline.eval_dataset(builder, config, local_eval_batch, info.num_eval_examples)
  train_iter = input_pipeline.train_dataset(builder, config, input_pipeline.process_batch_size(
      config.batch_size), start_step=start_step)
  device_batches = prefetch_to_mesh(train_iter, mesh)

  logger = ProgressLogger(workdir, num_steps, config.batch_size, start_step)
  train_metrics, summary = [], {}
  step = start_step
  with mesh:
    for step in range(start_step + 1, num_steps + 1):
      state, metrics = train_fn(state, next(device_batches))
      train_metrics.append(metrics)
      if step == start_step + 1:
        logger.restart_clock(step)  # The first step includes compilation.
      if step % config.log_every_steps == 0 or step == num_steps:
        summary = jax.tree.map(lambda *x: float(np.mean(jax.device_get(x))), *train_metrics)
        train_metrics = []
        logger.train_metrics(step, summary)
        if not np.isfinite(summary['loss']):
          raise FloatingPointError(f'The training loss is {summary["loss"]} at step {step}: lower the '
                                   f'learning rate (--config.lr) or enable gradient clipping.')
      if step % config.checkpoint_every_steps == 0 or step == num_steps:
        manager.save(step, args=ocp.args.StandardSave(state))
      if step % config.eval_every_steps == 0 and step != num_steps:
        evaluate_and_log(eval_fn, state, eval_ds, mesh, logger, step)
        logger.restart_clock(step)
    result = evaluate_and_log(eval_fn, state, eval_ds, mesh, logger, num_steps)
  manager.wait_until_finished()
  manager.close()
  return {**result, 'step': int(jax.device_get(state.step)), 'train_loss': summary.get('loss')}


def evaluate_and_log(eval_fn: Callable, state: TrainState, dataset, mesh: Mesh, logger: ProgressLogger,
                     step: int) -> Dict[str, float]:
  """Test metrics of the parameters and, when kept, of their moving average (`ema_accuracy`, `ema_loss`)."""
  result = evaluate(eval_fn, state.params, dataset, mesh)
  if state.ema_params is not None:
    ema = evaluate(eval_fn, state.ema_params, dataset, mesh)
    result.update({f'ema_{k}': v for k, v in ema.items()})
  logger.scalars(step, {f'eval/{k}': v for k, v in result.items() if k.endswith(('accuracy', 'loss'))})
  logging.info('step %d: eval %s', step, ', '.join(
      f'{k} {v:.4f}' for k, v in result.items() if k.endswith(('accuracy', 'loss'))))
  return result
