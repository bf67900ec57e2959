"""Trains a ViT from scratch, evaluates it, checkpoints it; restarting with the same workdir resumes.

  python -m vit_jax.main --config configs/default.py --workdir /tmp/vit_default
  python -m vit_jax.main --config configs/vit_l16.py --workdir gs://bucket/vit_l16 --config.data_dir=...

Multi-host: run the same command on every host. On TPU VMs, SLURM and Open MPI the processes find each
other by themselves; elsewhere pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I
(see launch/).
"""
import warnings

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from vit_jax import compilation_cache
from vit_jax import config_lib
from vit_jax import errors
from vit_jax import host_cpu
from vit_jax import paths
from vit_jax import peers
from vit_jax import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/default.py.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and TensorBoard summaries.')
flags.mark_flags_as_required(['config', 'workdir'])
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'yes', 'no'],
    'Call jax.distributed.initialize: "auto" when a coordinator is given or a TPU pod slice / SLURM / Open MPI '
    'job of several processes is detected.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0 (multi-process).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (with a coordinator).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index (with a coordinator).')
_HEARTBEAT = flags.DEFINE_integer(
    'heartbeat_timeout_seconds', 100, 'Multi-process: a process whose heartbeats stop for this long counts as '
    'lost; the others then stop, naming it (a peer on the same host is noticed at once).')
_ADOPT_CONFIG = flags.DEFINE_bool(
    'adopt_config', False, 'Resume checkpoints whose recorded config.json is missing or unreadable, under the '
    'config given (it becomes the record). Without it such a workdir is refused.')
_FALLBACK = flags.DEFINE_bool(
    'fallback_to_intact_checkpoint', True, 'When the newest checkpoint fails its checksums or cannot be read, '
    'set it aside (corrupt_checkpoints/) and resume from the newest intact one; false: stop instead.')


def cluster_process_count() -> int:
  """How many processes the cluster this process runs in has started for the job, by JAX's own detection
  (what `jax.distributed.initialize()` would configure itself from): a Cloud TPU VM slice through its metadata
  server, GKE, SLURM, Open MPI, Kubernetes. 1 when none is detected."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top  (JAX has no public API for it)
  with warnings.catch_warnings():  # E.g. Kubernetes' "package not installed": not ours to show on every run.
    warnings.simplefilter('ignore')
    for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
      if env.opt_in_only_method or not env.is_env_present():
        continue
      try:
        return int(env.get_process_count())
      except Exception:  # pylint: disable=broad-except  (a partial environment: not a cluster we can join)
        return 1
  return 1


def initialize_distributed() -> None:
  """Joins this process to the others, before any JAX computation (device discovery included)."""
  cluster_processes = cluster_process_count()
  wanted = _DISTRIBUTED.value == 'yes' or (
      _DISTRIBUTED.value == 'auto' and (_COORDINATOR.value is not None or cluster_processes > 1))
  if not wanted:
    if cluster_processes > 1:  # Each would train alone, all into one workdir (on a bucket, with no lock).
      raise errors.ConfigError(
          f'This process is one of {cluster_processes} that the cluster started for this job, but '
          f'--distributed={_DISTRIBUTED.value} keeps it apart from the others: each would train alone and write '
          'into the same workdir. Run with --distributed=auto (the default) so they train as one job, or start '
          'a single process.')
    return
  # Collectives between CPU devices of different processes (tests, CPU clusters); accelerators ignore it.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                             process_id=_PROCESS_ID.value, heartbeat_timeout_seconds=_HEARTBEAT.value)
  peers.register()
  peers.watch()
  logging.info('Process %d of %d; %d local devices of %d.', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config_lib.validate(_CONFIG.value)  # Before TensorFlow loads: a bad config fails within seconds.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # tf.data only feeds the host; keep TensorFlow off any accelerator that JAX needs.
  tf.config.set_visible_devices([], 'GPU')
  errors.quiet_library_logs()
  host_cpu.setup(_CONFIG.value)
  initialize_distributed()
  workdir = paths.absolute(_WORKDIR.value)
  cache = compilation_cache.directory_for(_CONFIG.value.compilation_cache_dir, workdir)
  if cache:
    compilation_cache.enable(cache)
  try:
    result = train.train_and_evaluate(_CONFIG.value, workdir, adopt_config=_ADOPT_CONFIG.value,
                                      fallback_to_intact_checkpoint=_FALLBACK.value)
  except (errors.UserError, errors.Preempted):
    peers.leaving()  # Every process stops the same way: none should take the others' exit for a loss.
    raise
  except Exception as e:  # pylint: disable=broad-except
    if jax.process_count() > 1:  # A peer lost mid-collective? Name it; else this process's own failure:
      peers.exit_on_lost_peer(e, wait_seconds=_HEARTBEAT.value + 10)  # its peers will name it.
    raise
  peers.leaving()
  compilation_cache.log_use('end of run')
  if _CONFIG.value.objective == 'masked_patches':
    print(f'Final masked-patch colour accuracy: {result["accuracy"]:.4f} ({result["correct"]}/{result["count"]} '
          f'corrupted patches of {_CONFIG.value.dataset}:{_CONFIG.value.eval_split}) after {result["step"]} '
          f'steps.', flush=True)
  else:
    print(f'Final test accuracy: {result["accuracy"]:.4f} ({result["correct"]}/{result["count"]} on '
          f'{_CONFIG.value.dataset}:{_CONFIG.value.eval_split}) after {result["step"]} steps.', flush=True)
  if 'ema_accuracy' in result:
    print(f'Final test accuracy of the moving average (ema_decay {_CONFIG.value.ema_decay}): '
          f'{result["ema_accuracy"]:.4f}.', flush=True)
  if result['train_loss'] is not None:
    print(f'Process {jax.process_index()}: last train loss {result["train_loss"]:.6f}', flush=True)


if __name__ == '__main__':
  errors.run(main)
