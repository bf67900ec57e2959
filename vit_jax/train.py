"""Training: optimizer and schedule, train state, `train_step` / `eval_step` as plain functions, their jitted
setup, and the loop (`train_and_evaluate`).

The steps are jitted over the device mesh of `sharding.py` with the shardings it gives; the loss comes from
the run's objective (`objectives.py`). The same code runs on one CPU device, on simulated devices and on a
pod.
"""
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Tuple

from absl import logging
import flax
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from vit_jax import checkpoints
from vit_jax import compilation_cache
from vit_jax import config_lib
from vit_jax import errors
from vit_jax import flops
from vit_jax import host_cpu
from vit_jax import models
from vit_jax import objectives
from vit_jax import paths
from vit_jax import preemption
from vit_jax import sharding
from vit_jax import storage
from vit_jax import workdir_lock


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
    raise errors.ConfigError('Set --config.total_steps or --config.num_epochs.')
  return max(1, int(config.num_epochs * num_train_examples / config.batch_size))


def learning_rate_schedule(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then linear or cosine decay to 0 at `num_steps` (paper Appendix B.1)."""
  warmup = config.warmup_steps
  if warmup >= num_steps:  # Reached with num_epochs; `config_lib.validate` checks total_steps.
    raise errors.ConfigError(config_lib.warmup_problem(warmup, num_steps))
  decay_steps = max(1, num_steps - warmup)
  if config.schedule == 'linear':
    decay = optax.linear_schedule(config.lr, 0.0, decay_steps)
  elif config.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(config.lr, decay_steps)
  else:
    raise errors.ConfigError(f'Unknown schedule {config.schedule!r}; choose "linear" or "cosine".')
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
    raise errors.ConfigError(f'Unknown optimizer {config.optimizer!r}; choose "adam" or "sgd".')
  if config.grad_clip_norm:
    optimizer = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optimizer)
  return optimizer


def init_state(model: nn.Module, optimizer: optax.GradientTransformation, rng: jax.Array,
               image_shape: Tuple[int, ...], objective, ema: bool = False) -> TrainState:
  """Fresh parameters: those of `model` trained for `objective` (masked patch prediction adds a [mask]
  embedding and a colour head instead of the classification head)."""
  images = jnp.zeros((1, *image_shape), jnp.float32)
  params = model.init(rng, images, **objective.init_inputs(model, image_shape))['params']
  return state_from_params(params, optimizer, ema)


def state_from_params(params: Any, optimizer: optax.GradientTransformation, ema: bool) -> TrainState:
  """Step 0 with these parameters; the moving average, if any, starts at them."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    ema_params=jax.tree.map(jnp.copy, params) if ema else None)


def train_step(state: TrainState, batch: Dict[str, jax.Array], *, model: nn.Module,
               optimizer: optax.GradientTransformation, objective, dropout_key: jax.Array,
               accum_steps: int = 1, ema_decay: float = 0.0) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One optimizer update on a global batch; returns the new state and the batch's metrics (the loss and
  accuracy of `objective`, the gradient norm).

  With `accum_steps` > 1 the batch is processed in that many equal micro-batches whose gradients are
  averaged: the same update as one step on the whole batch, with the activation memory of one micro-batch.
  """
  # Dropout noise is a function of (seed, step) only, so a resumed run draws what an uninterrupted one would.
  step_key = jax.random.fold_in(dropout_key, state.step)

  def loss_fn(params, micro_batch, key):
    return objective.train_loss(model, params, micro_batch, key)

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


def eval_step(params: Any, batch: Dict[str, jax.Array], *, model: nn.Module, objective) -> Dict[str, jax.Array]:
  """Sums over the batch (padding masked out), so that metrics add up exactly across batches."""
  return objective.eval_sums(model, params, batch)


def jit_train_step(model, optimizer, objective, config, mesh: Mesh, state_sharding) -> Callable:
  """`train_step` jitted with explicit shardings: state sharded as given, batch split, input state donated."""
  # A partial, not a lambda: the compiled program is named `train_step` (logs, profiles, compile counts).
  step = functools.partial(train_step, model=model, optimizer=optimizer, objective=objective,
                           dropout_key=jax.random.PRNGKey(config.seed + 1), accum_steps=config.accum_steps,
                           ema_decay=config.ema_decay)
  return jax.jit(step, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0,
                 compiler_options=host_cpu.compiler_options(config.cpu_matmul, mesh.devices.flat[0].platform))


def jit_eval_step(model, objective, config, mesh: Mesh, params_sharding) -> Callable:
  return jax.jit(lambda params, batch: eval_step(params, batch, model=model, objective=objective),
                 in_shardings=(params_sharding, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh),
                 compiler_options=host_cpu.compiler_options(config.cpu_matmul, mesh.devices.flat[0].platform))


def abstract_train_inputs(model, optimizer, objective, image_shape, batch_size: int, mesh: Mesh,
                          min_shard_size: int, ema: bool = False):
  """Shapes and shardings of the train step's arguments, without materialising a single weight."""
  state = jax.eval_shape(lambda rng: init_state(model, optimizer, rng, image_shape, objective, ema),
                         jax.random.PRNGKey(0))
  shardings = sharding.state_shardings(state, mesh, min_shard_size)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {'image': jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32, sharding=batch_sharding),
           'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch_sharding)}
  return state, batch


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """Everything a run needs but data and weights."""
  model: nn.Module
  optimizer: optax.GradientTransformation
  objective: Any  # `objectives.Classification` or `objectives.MaskedPatches`.
  image_shape: Tuple[int, int, int]
  ema: bool
  abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings.
  abstract_batch: Dict[str, jax.ShapeDtypeStruct]
  state_sharding: TrainState
  train_fn: Callable
  eval_fn: Callable
  init_fn: Callable

  def init_state(self, rng: jax.Array) -> TrainState:
    """Fresh weights, created directly in their shards (never whole on one device)."""
    return self.init_fn(rng)


def setup(config: ml_collections.ConfigDict, mesh: Mesh, num_classes: int, num_steps: int,
          channels: int) -> TrainSetup:
  """Model, optimizer, objective, abstract state and jitted steps. Checks run first (the config, batch vs
  devices and micro-batches, image size vs patch size), so bad input fails with a clear message before any
  compile."""
  config_lib.validate(config)
  sharding.check_batch_size(config.batch_size, mesh, config.accum_steps)
  if config.eval_batch_size:
    sharding.check_batch_size(config.eval_batch_size, mesh, field='eval_batch_size')
  model = models.from_config(config, num_classes)
  optimizer = create_optimizer(config, num_steps)
  objective = objectives.from_config(config)
  image_shape = (config.image_size, config.image_size, channels)
  ema = config.ema_decay > 0
  # Traces the model: a bad model/image-size combination fails here, with a clear message.
  abstract_state, abstract_batch = abstract_train_inputs(model, optimizer, objective, image_shape,
                                                         config.batch_size, mesh, config.mesh.min_shard_size,
                                                         ema)
  state_sharding = jax.tree.map(lambda x: x.sharding, abstract_state)
  init_fn = jax.jit(lambda rng: init_state(model, optimizer, rng, image_shape, objective, ema),
                    out_shardings=state_sharding,
                    compiler_options=host_cpu.light_compile_options(mesh.devices.flat[0].platform))
  return TrainSetup(model=model, optimizer=optimizer, objective=objective, image_shape=image_shape, ema=ema,
                    abstract_state=abstract_state, abstract_batch=abstract_batch,
                    state_sharding=state_sharding,
                    train_fn=jit_train_step(model, optimizer, objective, config, mesh, state_sharding),
                    eval_fn=jit_eval_step(model, objective, config, mesh, state_sharding.params),
                    init_fn=init_fn)


class ProgressLogger:
  """Logs step, loss, steps/s, images/s and ETA, and writes TensorBoard scalars (process 0 only)."""

  def __init__(self, workdir: str, num_steps: int, batch_size: int, start_step: int,
               train_flops_per_image: float = None, *, storage_patience_s: float = 0.0):
    self.enabled = jax.process_index() == 0
    self.num_steps, self.batch_size = num_steps, batch_size
    # Model FLOP/s per device and MFU (`flops.py`): the peak is looked up, or measured on a CPU host.
    self.flops_per_image = train_flops_per_image if self.enabled else None
    self.peak = flops.peak_flops_per_device() if self.flops_per_image else None
    self.last_step, self.last_time = start_step, time.perf_counter()
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (see train_and_evaluate)
    self.summary = tf.summary
    self.writer, self.patience_s = None, storage_patience_s
    if self.enabled:
      # TensorFlow reaches gs:// only through its own client and s3:// not at all without tensorflow-io: for a
      # URL, events are written to a local folder and each flush uploads the event file whole through the path
      # layer (TensorFlow's GCS client rewrites the whole object on every flush too).
      self.upload_to = workdir if paths.is_url(workdir) else None
      self.events_dir = tempfile.mkdtemp(prefix='vit_jax_events_') if self.upload_to else workdir
      self.writer = tf.summary.create_file_writer(self.events_dir)

  def scalars(self, step: int, scalars: Dict[str, float]) -> None:
    if not self.enabled:
      return
    with self.writer.as_default():
      for name, value in scalars.items():
        self.summary.scalar(name, value, step=step)
    self.writer.flush()
    if self.upload_to:
      storage.retrying(self.upload_to, f'uploading the TensorBoard events of step {step}',
                       lambda: paths.upload_tree(self.events_dir, self.upload_to), patience_s=self.patience_s)

  def train_metrics(self, step: int, metrics: Dict[str, float]) -> None:
    now = time.perf_counter()
    steps_per_sec = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    images_per_sec = steps_per_sec * self.batch_size
    eta = (self.num_steps - step) / max(steps_per_sec, 1e-9)
    speed = {'train/steps_per_sec': steps_per_sec, 'train/images_per_sec': images_per_sec}
    utilisation = ''
    if self.flops_per_image:
      per_device = images_per_sec * self.flops_per_image / jax.device_count()
      speed['train/tflops_per_device'] = per_device / 1e12
      utilisation = f'  {per_device / 1e12:.3g} TFLOP/s/device'
      if self.peak:
        speed['train/mfu'] = per_device / self.peak
        utilisation += f'  MFU {per_device / self.peak:.1%}'
    self.scalars(step, {**{f'train/{k}': v for k, v in metrics.items()}, **speed})
    if self.enabled:
      logging.info('step %d/%d  loss %.4f  accuracy %.4f  %.2f steps/s  %.0f images/s%s  ETA %s', step,
                   self.num_steps, metrics['loss'], metrics['accuracy'], steps_per_sec, images_per_sec,
                   utilisation, _format_seconds(eta))

  def restart_clock(self, step: int) -> None:
    """Excludes time spent outside training (eval, checkpoints, compilation) from the speed."""
    self.last_step, self.last_time = step, time.perf_counter()


class StepProfiler:
  """A profiler trace of the steps `config.profile_steps` = (first, last), every process its own host's, in
  `<workdir>/plugins/profile/` where TensorBoard's Profile tab finds it."""

  def __init__(self, steps, workdir: str):
    self.first, self.last = tuple(steps) or (0, -1)
    self.workdir, self.trace_dir = workdir, None

  def before_step(self, step: int) -> None:
    if step == self.first:
      # JAX's profiler writes local files only; for a URL the trace is uploaded when it ends.
      self.trace_dir = tempfile.mkdtemp(prefix='vit_jax_trace_') if paths.is_url(self.workdir) else self.workdir
      jax.profiler.start_trace(self.trace_dir)

  def after_step(self, step: int, state) -> None:
    if step == self.last and self.trace_dir:
      jax.block_until_ready(state)  # The trace holds the steps' device work, not just their dispatch.
      jax.profiler.stop_trace()
      if self.trace_dir != self.workdir:
        paths.upload_tree(self.trace_dir, self.workdir)
        shutil.rmtree(self.trace_dir, ignore_errors=True)
      logging.info('Profiler trace of steps %d-%d written to %s/plugins/profile.', self.first, self.last,
                   self.workdir)
      self.trace_dir = None


class CheckpointWriter:
  """Saves train states into a workdir's manager in the background, one at a time. On an object store that
  stops answering (one process), a save is waited out and made again (`storage.py`); a background save that
  the outage failed is said and replaced by the next. With several processes a save is a collective that all
  would have to repeat together: there any failure stops the run (a rerun resumes)."""

  def __init__(self, manager: ocp.CheckpointManager, workdir: str, replicated, patience_s: float):
    self.manager, self.workdir, self.replicated, self.patience_s = manager, workdir, replicated, patience_s
    self.in_flight = None  # The step being written in the background.
    self.retries = jax.process_count() == 1

  def wait(self) -> None:
    """Waits for the save in flight. One that failed because storage failed is said, not raised."""
    step, self.in_flight = self.in_flight, None
    if step is None:
      return
    try:
      with storage.reporting_stalls(self.workdir, f'the checkpoint of step {step}'):
        checkpoints.finish_saving(self.manager)
    except errors.CheckpointError as e:
      if not (self.retries and storage.is_outage(self.workdir, e)):
        raise
      logging.warning('The checkpoint of step %d was not written: its storage failed (%s). The next checkpoint '
                      'replaces it.', step, errors.one_line(e, 300))

  def save(self, step: int, state: TrainState, *, commit: bool) -> None:
    """Starts saving `state`; `commit`: and returns once it is committed (the last step, a preemption)."""

    def save_once():
      self.wait()
      checkpoints.save_train_state(self.manager, step, state, self.replicated)
      self.in_flight = step
      if commit:
        self.in_flight = None
        checkpoints.finish_saving(self.manager)

    if not self.retries:
      return save_once()
    storage.retrying(self.workdir, f'the checkpoint of step {step}', save_once, patience_s=self.patience_s,
                     safe=lambda: UNCOUNTED_CHECKPOINTS)


def _format_seconds(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}:{minutes:02d}:{seconds:02d}'


def evaluate(eval_fn: Callable, params: Any, dataset, mesh: Mesh) -> Dict[str, float]:
  totals = None
  for batch in dataset.as_numpy_iterator():
    sums = eval_fn(params, sharding.to_global_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.tree.map(lambda x: float(jax.device_get(x)), totals)
  count = totals['count']
  return {'accuracy': totals['correct'] / count, 'loss': totals['loss'] / count,
          'correct': int(totals['correct']), 'count': int(count)}


def init_from_pretrained(run: TrainSetup, config: ml_collections.ConfigDict) -> TrainState:
  """Fine-tuning: a fresh state whose parameters come from `config.init_from` (a published-layout `.npz` or a
  vit_jax workdir), adapted to this model (new zero head, position embeddings resized to the new grid).
  Everything is checked before the state is replaced: a mismatch never leaves a half-loaded model."""
  source = config.init_from
  pretrained = checkpoints.load_pretrained(source)
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, adopt_config: bool = False,
                       fallback_to_intact_checkpoint: bool = True) -> Dict[str, float]:
  """Trains from scratch (or resumes from the newest intact checkpoint in `workdir`), then evaluates. The
  process's host is set up by the caller (`host_cpu.setup`, before JAX starts).

  `adopt_config`: resume checkpoints whose recorded config is missing or unreadable under this config.
  `fallback_to_intact_checkpoint`: False refuses to resume when the newest checkpoint is damaged, instead of
  setting it aside and resuming from the newest intact one."""
  config_lib.validate(config)
  started = time.time()
  for path, what in ((workdir, 'the start of the run'), (config.data_dir, 'reading the dataset')):
    if path:
      storage.wait_until_answering(path, what=what, patience_s=config.storage_patience_minutes * 60,
                                   safe=lambda: UNCOUNTED_CHECKPOINTS)
  # Watched from here: a SIGTERM during setup or compilation stops the run at its first step, saved.
  preemption_watch = preemption.Watch()
  try:
    with _workdir_lock(workdir):
      return _train_and_evaluate(config, workdir, adopt_config, fallback_to_intact_checkpoint, preemption_watch,
                                 started)
  except Exception as e:  # pylint: disable=broad-except  (re-raised, as it is or as one line)
    if isinstance(e, (errors.UserError, errors.Preempted)):
      raise
    cause = _cause_a_user_can_fix(e, config, workdir)
    if cause is None:
      raise
    raise cause from e
  finally:
    preemption_watch.close()


UNCOUNTED_CHECKPOINTS = 'Its newest committed checkpoint cannot be counted while storage does not answer. '


def _cause_a_user_can_fix(error: Exception, config: ml_collections.ConfigDict, workdir: str):
  """The user error behind a library's exception, when there is one: storage that stopped answering (outside
  the calls that wait for it), devices out of memory, a damaged dataset. None: a bug, keep the traceback."""
  down = next((problem for problem in map(storage.problem, (workdir, config.data_dir or '')) if problem), None)
  if down is not None:
    return storage.StorageUnreachable(
        f'Storage of {workdir} does not answer ({down}); the run stopped ({errors.one_line(error, 300)}). '
        f'{UNCOUNTED_CHECKPOINTS}Rerun the same command once it answers: the run resumes from its newest '
        'committed checkpoint.')
  if 'RESOURCE_EXHAUSTED' in str(error) and 'memory' in str(error).lower():  # XLA's words on CPU, GPU and TPU.
    devices = jax.device_count()
    return errors.ConfigError(
        f'Out of memory on the {jax.devices()[0].platform.upper()} devices ({errors.one_line(error, 200)}). What '
        f'sets the memory a step needs: config.batch_size={config.batch_size} ({config.batch_size // devices} '
        f'per device on {devices}), the model ({config.model.name}, from config.model), '
        f'config.dtype={config.dtype}. Lower the batch (e.g. --config.batch_size={max(1, config.batch_size // 2)}'
        f'), or keep it and split it in micro-batches (--config.accum_steps=2), recompute activations '
        '(--config.model.remat=True), compute in bfloat16 (--config.dtype=bfloat16), or shard the parameters '
        'over more devices (--config.mesh.fsdp).')
  if 'tensorflow' in sys.modules:  # Only TensorFlow reads datasets.
    from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    return input_pipeline.damaged_dataset_error(error, config.dataset, config.data_dir)
  return None


@contextlib.contextmanager
def _workdir_lock(workdir: str):
  """Process 0 holds the workdir's lock; every process stops if it cannot (none may write into a workdir in
  use)."""
  lock, refusal = None, None
  if jax.process_index() == 0:
    if paths.is_url(workdir):
      logging.warning('No lock on %s: object stores have none; make sure no other run uses it.', workdir)
    else:
      lock = workdir_lock.WorkdirLock(workdir)
      try:
        lock.acquire()
      except errors.WorkdirError as e:
        refusal = e
  if jax.process_count() > 1:
    if not multihost_utils.broadcast_one_to_all(np.array(refusal is None)):
      refusal = refusal or errors.WorkdirError(f'Process 0 could not lock {workdir}: see its log.')
  if refusal is not None:
    raise refusal
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def _train_and_evaluate(config, workdir, adopt_config, fallback_to_intact_checkpoint, preemption_watch, started):
  # TensorFlow (tf.data, summaries) is imported only here: the steps above run without it (benchmarks, and
  # processes that use PyTorch, whose triton crashes when loaded after TensorFlow).
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(config.mesh)
  builder = input_pipeline.get_builder(config.dataset, config.data_dir)
  info = input_pipeline.get_info(builder, config)
  num_steps = total_steps(config, info.num_train_examples)
  run = setup(config, mesh, info.num_classes, num_steps, info.channels)
  manager = checkpoints.train_state_manager(workdir, config.keep_checkpoints)
  writer = CheckpointWriter(manager, workdir, sharding.replicated(mesh), config.storage_patience_minutes * 60)

  if manager.latest_step() is not None:
    config_lib.check_resumable(config, workdir, adopt=adopt_config)
  if jax.process_index() == 0:
    config_lib.save_workdir_config(config, workdir)  # After the check: it compares with the recorded config.
    config_lib.record_code_version(workdir, resuming=manager.latest_step() is not None)
  # Collective: every process restores (and verifies) its own shards of the state.
  state, latest, written_by = checkpoints.restore_newest_intact(
      manager, ocp.args.StandardRestore(run.abstract_state), workdir, fallback=fallback_to_intact_checkpoint,
      out_sharding=sharding.replicated(mesh))
  if latest is not None:
    logging.info('Resumed from the checkpoint of step %d in %s (checksums verified).', latest, manager.directory)
    if written_by is not None and written_by != jax.process_count():
      logging.warning(
          'The checkpoint of step %d was written by %d processes; this run has %d. Each process reads its own '
          'shard of the data in its own shuffled order, so from here on the global example order differs from '
          'an uninterrupted run\'s: training continues correctly, but not bit for bit as the original would '
          'have. Resume with %d processes to keep the order.', latest, written_by, jax.process_count(),
          written_by)
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
  device_batches = sharding.prefetch_to_mesh(train_iter, mesh)

  logger = ProgressLogger(workdir, num_steps, config.batch_size, start_step,
                          flops.train_flops_per_image(config, info.num_classes, info.channels)
                          if jax.process_index() == 0 else None,
                          storage_patience_s=config.storage_patience_minutes * 60)
  profiler = StepProfiler(config.profile_steps, workdir)
  fewshot_evaluator = None
  if config.fewshot.tasks:
    from vit_jax import fewshot  # pylint: disable=g-import-not-at-top  (TensorFlow, as input_pipeline)
    fewshot_evaluator = fewshot.Evaluator(config, run.model, mesh, info.channels)
  train_metrics, summary = [], {}
  step = start_step
  with mesh:  # Compiled under the mesh context, as the loop calls it (another context would compile it again).
    if start_step < num_steps:
      device_batches = _first_batch_while_compiling(device_batches, train_fn, state, run.abstract_batch)
    for step in range(start_step + 1, num_steps + 1):
      profiler.before_step(step)
      state, metrics = train_fn(state, next(device_batches))
      profiler.after_step(step, state)
      train_metrics.append(metrics)
      if step == start_step + 1:
        logger.restart_clock(step)  # The first step includes compilation.
        if jax.process_index() == 0:
          logging.info('Step %d done %.1f s after the run began (setup, restore and compilation included).', step,
                       time.time() - started)
        compilation_cache.log_use(f'step {step}')
      if step % config.log_every_steps == 0 or step == num_steps:
        summary = jax.tree.map(lambda *x: float(np.mean(jax.device_get(x))), *train_metrics)
        train_metrics = []
        logger.train_metrics(step, summary)
        if not np.isfinite(summary['loss']):
          raise divergence_error(f'the mean training loss is {summary["loss"]}', step, config, manager)
      preempted = preemption_watch.reached(step)
      if step % config.checkpoint_every_steps == 0 or step == num_steps or preempted:
        # Checked at this very step: a diverging run never replaces finite checkpoints by non-finite ones.
        if not bool(all_finite((metrics['loss'], state.params))):
          raise divergence_error('the loss or parameters are not finite', step, config, manager)
        writer.save(step, state, commit=preempted or step == num_steps)
      if preempted:
        if preemption_watch.interrupted:
          raise errors.Preempted(
              f'Stopped by Ctrl-C at step {step} of {num_steps}, after saving its checkpoint in '
              f'{manager.directory}. Rerun the same command to resume from it.', errors.INTERRUPTED_EXIT_STATUS)
        raise errors.Preempted(
            f'Stopped by SIGTERM (preemption) at step {step} of {num_steps}, after saving its checkpoint in '
            f'{manager.directory}. Rerun the same command to resume from it (exit status '
            f'{errors.PREEMPTED_EXIT_STATUS} says so to launchers).')
      if step % config.eval_every_steps == 0 and step != num_steps:
        evaluate_and_log(eval_fn, state, eval_ds, mesh, logger, step)
        logger.restart_clock(step)
      if fewshot_evaluator and config.fewshot.every_steps and step % config.fewshot.every_steps == 0 and (
          step != num_steps):
        fewshot_and_log(fewshot_evaluator, state, logger, step)
        logger.restart_clock(step)
    result = evaluate_and_log(eval_fn, state, eval_ds, mesh, logger, num_steps)
    if fewshot_evaluator:
      result.update(fewshot_and_log(fewshot_evaluator, state, logger, num_steps))
  writer.wait()
  manager.close()
  return {**result, 'step': int(jax.device_get(state.step)), 'train_loss': summary.get('loss')}


def _first_batch_while_compiling(device_batches, train_fn, state, abstract_batch):
  """`device_batches`, its first batch drawn in a thread while this one compiles the train step: the first
  batch waits for the input pipeline to fill its shuffle buffer, compiling waits for XLA, and neither needs
  the other. The loop's first call then finds the step compiled."""
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='first_batch') as pool:
    first = pool.submit(next, device_batches)
    train_fn.lower(state, abstract_batch).compile()
    return itertools.chain([first.result()], device_batches)


@jax.jit
def all_finite(tree) -> jax.Array:
  """Whether every element of every array of `tree` is finite (one scalar, however the arrays are sharded)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def divergence_error(what: str, step: int, config: ml_collections.ConfigDict,
                     manager: ocp.CheckpointManager) -> errors.TrainingDiverged:
  """The error that stops a diverged run: what went wrong where, which checkpoint is kept, what to change."""
  manager.wait_until_finished()
  kept = manager.latest_step()
  kept = (f'the newest checkpoint, step {kept} in {manager.directory}, is finite' if kept is not None
          else 'no checkpoint was written')
  if config.grad_clip_norm:
    advice = (f'gradient clipping is already on (global norm {config.grad_clip_norm}): lower the learning rate '
              f'(now {config.lr})')
  else:
    advice = 'lower the learning rate or clip gradients (--config.grad_clip_norm=1.0)'
  return errors.TrainingDiverged(
      f'Training diverged: {what} at step {step}. Nothing non-finite was saved: {kept}. A restart would '
      f'diverge the same way; {advice}, in a new --workdir.')


def fewshot_and_log(evaluator, state: TrainState, logger: ProgressLogger, step: int) -> Dict[str, float]:
  """Few-shot accuracies of the parameters (vit_jax.fewshot), logged and returned as fewshot/<task>/<k>shot."""
  from vit_jax import fewshot  # pylint: disable=g-import-not-at-top
  scalars = fewshot.scalars(evaluator(state.params))
  logger.scalars(step, scalars)
  if jax.process_index() == 0:
    logging.info('step %d: %s', step, ', '.join(f'{k} {v:.4f}' for k, v in scalars.items()
                                                 if not k.endswith('_std')))
  return scalars


def evaluate_and_log(eval_fn: Callable, state: TrainState, dataset, mesh: Mesh, logger: ProgressLogger,
                     step: int) -> Dict[str, float]:
  """Test metrics of the parameters and, when kept, of their moving average (`ema_accuracy`, `ema_loss`)."""
  result = evaluate(eval_fn, state.params, dataset, mesh)
  if state.ema_params is not None:
    ema = evaluate(eval_fn, state.ema_params, dataset, mesh)
    result.update({f'ema_{k}': v for k, v in ema.items()})
  logger.scalars(step, {f'eval/{k}': v for k, v in result.items() if k.endswith(('accuracy', 'loss'))})
  if jax.process_index() == 0:  # Every process computes the same numbers; one reports them.
    logging.info('step %d: eval %s', step, ', '.join(
        f'{k} {v:.4f}' for k, v in result.items() if k.endswith(('accuracy', 'loss'))))
  return result
