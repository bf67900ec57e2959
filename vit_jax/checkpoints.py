"""Checkpoints: the train state in a workdir (orbax), parameters in the layout of the published ViT checkpoints
(`.npz` import and export), and pretrained weights loaded into a model built for a new task (new head,
resized position embeddings).

A workdir holds `config.json` (`config_lib`), `lock` while a run uses it (`workdir_lock`) and
`checkpoints/<step>/`: `state/` (the orbax train state: step, parameters, optimizer state, moving average) and
`integrity/` (a checksum of every array, written in the same atomic commit). A restore recomputes the checksums
of what it read; a checkpoint that fails (unreadable, truncated, altered) is reported, moved to
`corrupt_checkpoints/` and the newest intact one is used instead.

A published file is a flat `np.savez` of arrays keyed by '/'-joined parameter paths, e.g.
`Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel`; our models use the same names, so
a file loads by unflattening it. Scanned models (`scan=True`) are converted to the per-layer layout on export.
"""
import functools
import logging as py_logging
import sys
import time
import zipfile
from typing import Any, Dict, List, Optional, Tuple

from absl import logging

import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import scipy.ndimage

from vit_jax import errors
from vit_jax import host_cpu
from vit_jax import models
from vit_jax import paths
from vit_jax import storage

POSEMB_PATH = ('Transformer', 'posembed_input', 'pos_embedding')
CHECKPOINT_DIR = 'checkpoints'  # Inside a workdir.
CORRUPT_DIR = 'corrupt_checkpoints'  # Inside a workdir: checkpoints that failed verification, kept for a look.
STATE_ITEM, INTEGRITY_ITEM = 'state', 'integrity'  # The two items of a train-state checkpoint.


CheckpointError = errors.CheckpointError


class CorruptCheckpoint(CheckpointError):
  """A train-state checkpoint that does not read back as written; the message names its step and folder."""


def flatten(params: Any) -> Dict[str, np.ndarray]:
  """Nested parameters -> {'a/b/c': numpy array}, in the published per-layer layout."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(models.unstack_layers(params)), sep='/')
  return {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}


def unflatten(flat: Dict[str, np.ndarray]) -> Dict[str, Any]:
  return flax.traverse_util.unflatten_dict(dict(flat), sep='/')


def save_npz(params: Any, path: str) -> None:
  """Writes `params` as a published-layout `.npz`, whole or not at all (`paths.atomic_writer`)."""
  with paths.atomic_writer(path) as f:
    np.savez(f, **flatten(params))


def load_npz(path: str) -> Dict[str, Any]:
  """A published-layout `.npz` -> nested numpy parameters. Every array is read (and CRC-checked) here, so a
  corrupt or truncated file fails now, naming the file, not halfway through building a model."""
  if not paths.exists(path):
    raise CheckpointError(f'Checkpoint file {path!r} does not exist.')
  if paths.isdir(path):
    raise CheckpointError(f'{path!r} is a folder, not a .npz file, and not a vit_jax workdir either (it has no '
                          f'{CHECKPOINT_DIR}/ folder): give the workdir of a `python -m vit_jax.main` run, or a '
                          'published-layout .npz file.')
  try:
    with paths.open_file(path, 'rb') as f, np.load(f, allow_pickle=False) as data:
      flat = {key: data[key] for key in data.files}
  except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as e:
    raise CheckpointError(f'Cannot read {path!r} as a .npz checkpoint ({type(e).__name__}: {e}); the file is '
                          f'corrupt or truncated: download or export it again.') from e
  if not flat:
    raise CheckpointError(f'{path!r} holds no arrays.')
  return unflatten(flat)


def checkpoint_dir(workdir: str) -> str:
  return paths.join(workdir, CHECKPOINT_DIR)


def is_workdir(path: str) -> bool:
  """Whether `path` is a vit_jax.main workdir (with checkpoints), not a weights file."""
  return paths.isdir(checkpoint_dir(path))


def train_state_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """The orbax manager of a workdir's train-state checkpoints, keeping the newest `keep`. Orbax writes each
  checkpoint to a temporary folder and renames it when complete: a crash mid-save leaves the previous one as
  the latest readable checkpoint."""
  _quiet_echoes_of_failed_io()
  # Folders are created before `save` returns: created in the background, a failure to create them (storage
  # down) left orbax's writer threads waiting minutes for a signal that never came, holding the process open.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=True,
      async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=(STATE_ITEM, INTEGRITY_ITEM))


def _path_name(path) -> str:
  """'params/Transformer/encoderblock_0/...' for a pytree path (attribute, dict key or index)."""
  parts = []
  for entry in path:
    for attribute in ('name', 'key', 'idx'):
      if hasattr(entry, attribute):
        parts.append(str(getattr(entry, attribute)))
        break
  return '/'.join(parts)


def _fingerprint(x: jax.Array) -> jax.Array:
  """Two 32-bit sums over the elements of `x`, each element's bits mixed with its position by a bijection: a
  change of any element changes each sum, and a swap of two elements changes them too (odds of a collision
  ~2^-64). Sums modulo 2^32 do not depend on the order of addition, so the fingerprint is the same however
  `x` is sharded."""
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32) if x.dtype != jnp.bool_ else (
      x.astype(jnp.uint32))
  # The flat position of each element, from one iota per axis (a reshape would gather sharded arrays).
  position, stride = jnp.zeros(x.shape, jnp.uint32), 1
  for axis in reversed(range(x.ndim)):
    position = position + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= x.shape[axis]
  sums = []
  for seed in (0x9E3779B9, 0x85EBCA6B):
    v = bits ^ (position * jnp.uint32(seed) + jnp.uint32(seed))
    v = (v ^ (v >> 16)) * jnp.uint32(0x7FEB352D)  # An invertible integer hash (xorshift-multiply).
    v = (v ^ (v >> 15)) * jnp.uint32(0x846CA68B)
    sums.append(jnp.sum(v ^ (v >> 16), dtype=jnp.uint32))
  return jnp.stack(sums)


@functools.lru_cache(maxsize=None)
def _fingerprint_fn(out_sharding):
  # One small program per array shape, reused by the layers that share it: far cheaper to compile than one
  # program over every array (docs/faults.md has both).
  return jax.jit(_fingerprint, out_shardings=out_sharding, compiler_options=host_cpu.light_compile_options(
      next(iter(out_sharding.device_set)).platform if out_sharding is not None else None))


def array_checksums(tree: Any, out_sharding=None) -> Dict[str, List[int]]:
  """{array path: two 32-bit checksums} of every array of `tree`, computed where the arrays are.
  `out_sharding`: a replicated sharding of their mesh, so that every process can read the sums."""
  named = jax.tree_util.tree_flatten_with_path(tree)[0]
  fingerprint = _fingerprint_fn(out_sharding)
  # One at a time: several small collective programs in flight at once deadlocked two CPU processes (gloo).
  sums = [jax.device_get(fingerprint(x)) for _, x in named]
  return {_path_name(path): [int(v) for v in np.asarray(s)] for (path, _), s in zip(named, sums)}


def save_train_state(manager: ocp.CheckpointManager, step: int, state: Any, out_sharding=None) -> None:
  """Saves `state` (asynchronously) with the checksums of its arrays, in one atomic commit. A failure to
  write (this save's or the previous one's, which surfaces here) raises CheckpointError."""
  # The process count decides how the data is sharded, hence the example order a resume continues.
  record = {'format': 1, 'step': step, 'process_count': jax.process_count(),
            'arrays': array_checksums(state, out_sharding)}
  try:
    manager.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                                  INTEGRITY_ITEM: ocp.args.JsonSave(record)}))
  except Exception as e:  # pylint: disable=broad-except
    raise _write_failed(manager, e) from e


def finish_saving(manager: ocp.CheckpointManager) -> None:
  """Waits for the last asynchronous save to commit; raises CheckpointError if it failed."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _write_failed(manager, e) from e


def _write_failed(manager: ocp.CheckpointManager, error: BaseException) -> CheckpointError:
  down = storage.problem(manager.directory)
  if down is not None:  # Nothing can be counted: a listing now would find nothing and mislead.
    return CheckpointError(
        f'Writing a checkpoint into {manager.directory} failed: its storage does not answer ({down}). '
        f'Checkpoints written before are intact (orbax commits each one whole), but the newest cannot be counted '
        f'while storage is down. Rerun the same command once it answers: the run resumes from the newest.')
  steps = [step for step in manager.all_steps() if paths.isdir(paths.join(manager.directory, str(step)))]
  newest = f'step {max(steps)}' if steps else 'none: the run starts over'
  return CheckpointError(
      f'Writing a checkpoint into {manager.directory} failed ({errors.one_line(error, 600)}). Checkpoints written '
      f'before are intact (orbax commits each one whole); the newest is {newest}. Free space or fix the storage, '
      f'then rerun the same command to resume from it.')


def _is_echo_of_failed_io(error: BaseException) -> bool:
  text = str(error)
  return ((isinstance(error, RuntimeError) and text == 'Event loop is closed') or
          'Encountered error while reading array index' in text or 'in OCDBT database at' in text)


def _quiet_echoes_of_failed_io() -> None:
  """When one array of a checkpoint cannot be read or written, orbax abandons the others; as they end (then
  or seconds later) each prints a traceback, some quoting a storage spec of ~60 lines: through
  `sys.excepthook` from the storage library's threads ('Event loop is closed'), `sys.unraisablehook` or
  asyncio's logger. The error itself reaches the caller through orbax and is reported once; these echoes are
  dropped. (Only echoes: an uncaught error of any other kind still prints.)"""
  if getattr(sys.excepthook, 'drops_io_echoes', False):
    return
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

  def filtered_excepthook(exc_type, value, traceback):
    if not (isinstance(value, RuntimeError) and str(value) == 'Event loop is closed'):
      excepthook(exc_type, value, traceback)

  def filtered_unraisablehook(unraisable):
    if not _is_echo_of_failed_io(unraisable.exc_value):
      unraisablehook(unraisable)

  filtered_excepthook.drops_io_echoes = True
  sys.excepthook, sys.unraisablehook = filtered_excepthook, filtered_unraisablehook
  py_logging.getLogger('asyncio').addFilter(
      lambda record: not (record.exc_info and _is_echo_of_failed_io(record.exc_info[1])))


def _restore_verified(manager: ocp.CheckpointManager, step: int, state_args, out_sharding=None):
  """(state, integrity record) of checkpoint `step`, read and checked against its checksums; raises
  CheckpointError naming
  the step and what failed. Collective: every process calls it, and they agree on the outcome."""
  step_dir = paths.join(manager.directory, str(step))
  problem, restored = None, None
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: state_args,
                                                               INTEGRITY_ITEM: ocp.args.JsonRestore()}))
  except Exception as e:  # pylint: disable=broad-except  (any failure to read makes the checkpoint unusable)
    if paths.isdir(paths.join(step_dir, 'default')):
      problem = ('it was written by a vit_jax without integrity records (a "default" item): it cannot be '
                 'verified; resume it with that version, or start a new --workdir')
    else:
      problem = f'it cannot be read ({errors.one_line(e)})'
  if jax.process_count() > 1:  # A process that failed to read must not leave the others in a collective.
    if not np.all(multihost_utils.process_allgather(np.array(problem is None))):
      problem = problem or 'another process could not read its part of it'
  if problem is None:
    record = restored[INTEGRITY_ITEM]
    if not isinstance(record, dict) or not isinstance(record.get('arrays'), dict):
      problem = f'its integrity record ({INTEGRITY_ITEM}/) is missing or unreadable'
    else:
      actual = array_checksums(restored[STATE_ITEM], out_sharding)
      bad = sorted(name for name, sums in actual.items() if record['arrays'].get(name) != sums)
      if bad:
        problem = (f'{len(bad)} of its {len(actual)} arrays differ from the checksums recorded when it was '
                   f'written ({", ".join(bad[:3])}{", ..." if len(bad) > 3 else ""}): its files were altered')
  if problem is not None:
    raise CorruptCheckpoint(f'The checkpoint of step {step} ({step_dir}) is not intact: {problem}.')
  return restored[STATE_ITEM], restored[INTEGRITY_ITEM]


def restore_newest_intact(manager: ocp.CheckpointManager, state_args, workdir: str, fallback: bool = True,
                          out_sharding=None) -> Tuple[Any, Optional[int], Optional[int]]:
  """(state, step, number of processes that wrote it) of the newest checkpoint that reads back with its
  recorded checksums; (None, None, None) when there is no checkpoint. Newer checkpoints that fail are moved
  to `corrupt_checkpoints/` (kept, not deleted) with a warning; with `fallback=False`, or when none is
  intact, it raises naming each failure instead."""
  failures = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state, record = _restore_verified(manager, step, state_args, out_sharding)
    except CorruptCheckpoint as e:
      failures.append((step, str(e)))
      if not fallback:
        raise CheckpointError(f'{e} (Without --fallback_to_intact_checkpoint=false the run would resume from '
                              'the newest intact one.)') from None
      continue
    if failures:
      moved = _set_aside(manager, workdir, [s for s, _ in failures])
      for (_, message), where in zip(failures, moved):
        logging.warning('%s Moved to %s; resuming from step %d instead.', message, where, step)
    return state, step, record.get('process_count')
  if failures:
    raise CheckpointError('No intact checkpoint to resume from:\n  ' + '\n  '.join(m for _, m in failures) +
                          f'\nThey are left in place. Start a new --workdir, or move {checkpoint_dir(workdir)} '
                          'aside to start over in this one.')
  return None, None, None


def _set_aside(manager: ocp.CheckpointManager, workdir: str, steps: List[int]) -> List[str]:
  """Moves checkpoints out of the manager's folder (process 0), so that their steps can be written again."""
  destination = paths.join(workdir, CORRUPT_DIR)
  stamp = time.strftime('%Y%m%d-%H%M%S')
  moved = [paths.join(destination, f'{step}-{stamp}') for step in steps]
  if jax.process_index() == 0:
    paths.makedirs(destination)
    for step, target in zip(steps, moved):
      paths.move(paths.join(manager.directory, str(step)), target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('vit_jax: corrupt checkpoints set aside')
  manager.reload()
  return moved


def load_pretrained(source: str) -> Dict[str, Any]:
  """Pretrained parameters from a vit_jax workdir (its newest intact checkpoint) or a published-layout `.npz`,
  checked finite: a NaN weight would otherwise surface steps later as a diverged run."""
  if is_workdir(source):
    params, _ = restore_params(source)
  else:
    params = load_npz(source)
  bad = [key for key, value in flatten(params).items()
         if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value))]
  if bad:
    raise CheckpointError(f'{source} holds non-finite values (NaN or inf) in {len(bad)} array(s): '
                          f'{", ".join(bad[:5])}{", ..." if len(bad) > 5 else ""}. Use another checkpoint.')
  return params


def _reading_manager(workdir: str) -> ocp.CheckpointManager:
  directory = checkpoint_dir(paths.absolute(workdir))
  if not paths.isdir(directory):
    raise CheckpointError(f'No checkpoints in {workdir!r}: expected a vit_jax.main workdir with '
                          f'a {CHECKPOINT_DIR}/ folder.')
  _quiet_echoes_of_failed_io()
  handlers = {STATE_ITEM: ocp.PyTreeCheckpointHandler(), INTEGRITY_ITEM: ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, item_handlers=handlers)


def _steps_to_try(manager: ocp.CheckpointManager, step: Optional[int]) -> List[int]:
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None and step not in steps:
    raise CheckpointError(f'No checkpoint of step {step} in {manager.directory}; it has {sorted(steps)}.')
  if not steps:
    raise CheckpointError(f'No checkpoint in {manager.directory}.')
  return [step] if step is not None else steps


def restore_params(workdir: str, step=None, ema=None):
  """The parameters of a workdir's checkpoint (by default the newest whose parameters are intact), as numpy
  arrays on this host, whatever the mesh that wrote them, verified against their recorded checksums. `ema`:
  the moving average of the parameters (`config.ema_decay` > 0) instead of the parameters; None: the average
  when the run kept one."""
  with _reading_manager(workdir) as manager:
    failures = []
    for candidate in _steps_to_try(manager, step):
      try:
        arrays = _read_verified(manager, candidate, lambda metadata: [_params_key(metadata, candidate, ema)])
      except CorruptCheckpoint as e:
        if step is not None:
          raise
        failures.append(str(e))
        continue
      for message in failures:
        logging.warning('%s Using step %d instead.', message, candidate)
      return jax.tree.map(np.asarray, next(iter(arrays.values()))), candidate
  raise CheckpointError('No intact checkpoint:\n  ' + '\n  '.join(failures))


def verify(workdir: str, step: int) -> None:
  """Reads every array of a workdir's checkpoint (parameters, optimizer state, moving average) and checks it
  against the recorded checksums; raises CorruptCheckpoint naming what failed."""
  with _reading_manager(workdir) as manager:
    _steps_to_try(manager, step)
    _read_verified(manager, step, lambda metadata: [key for key, value in metadata.items() if value is not None])


def _params_key(metadata: dict, step: int, ema) -> str:
  has_ema = metadata.get('ema_params') is not None
  if ema and not has_ema:
    raise CheckpointError(f'The checkpoint of step {step} has no moving average of the parameters (the run had '
                          f'config.ema_decay=0): use its parameters.')
  return 'ema_params' if (has_ema if ema is None else ema) else 'params'


def _read_verified(manager: ocp.CheckpointManager, step: int, select) -> Dict[str, Any]:
  """The parts `select(metadata)` of a checkpoint's state, on this host's first device, verified."""
  try:
    metadata = dict(manager.item_metadata(step)[STATE_ITEM])
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptCheckpoint(f'The checkpoint of step {step} ({manager.directory}/{step}) is not intact: its '
                            f'metadata cannot be read ({errors.one_line(e)}).') from None
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  # Only the selected parts are read (and verified); the rest stays on disk.
  target = {key: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata[key])
            for key in select(metadata)}
  args = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)
  return _restore_verified(manager, step, args)[0]


def resize_posemb(posemb: np.ndarray, new_grid: Tuple[int, int], num_prefix_tokens: int) -> np.ndarray:
  """Position embeddings (1, prefix + h*w, D) -> (1, prefix + H*W, D): the patch grid is interpolated in 2-D,
  the [CLS] embedding is kept apart unchanged (paper Sec. 3.2). Linear interpolation with the corner
  embeddings kept at the corners (`scipy.ndimage.zoom`, order 1), as the published fine-tuning code does."""
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
  old_side = int(round(np.sqrt(grid.shape[0])))
  if old_side * old_side != grid.shape[0]:
    raise CheckpointError(f'Cannot resize position embeddings of {grid.shape[0]} patches: not a square grid.')
  if (old_side, old_side) == tuple(new_grid):
    return posemb
  grid = np.asarray(grid, np.float64).reshape(old_side, old_side, -1)
  resized = scipy.ndimage.zoom(grid, (new_grid[0] / old_side, new_grid[1] / old_side, 1), order=1)
  resized = resized.astype(posemb.dtype).reshape(1, new_grid[0] * new_grid[1], -1)
  return np.concatenate([prefix, resized], axis=1)


def resize_relative_bias(table: np.ndarray, new_grid: Tuple[int, int]) -> np.ndarray:
  """Relative position biases ((2h-1)(2w-1) + 1, heads) of a square h x h grid -> those of `new_grid`: the
  table of 2-D offsets is interpolated bilinearly, the bias of pairs with [CLS] (the last row) kept."""
  offsets, prefix = table[:-1], table[-1:]
  side = int(round(np.sqrt(offsets.shape[0])))
  if side * side != offsets.shape[0] or side % 2 == 0:
    raise CheckpointError(f'Cannot resize relative position biases of {offsets.shape[0]} offsets: not those '
                          f'of a square grid.')
  new_shape = (2 * new_grid[0] - 1, 2 * new_grid[1] - 1, offsets.shape[-1])
  resized = jax.image.resize(offsets.reshape(side, side, -1), new_shape, method='bilinear', antialias=False)
  return np.concatenate([np.asarray(resized, table.dtype).reshape(-1, table.shape[-1]), prefix])


def adapt_to_model(pretrained: Dict[str, Any], init_params: Any, grid: Tuple[int, int],
                   num_prefix_tokens: int, keep_head: bool = False) -> Dict[str, Any]:
  """Pretrained parameters for a model whose fresh parameters are `init_params`.

  - `head`: taken from `init_params` (zeros, sized for the new classes) unless `keep_head` and shapes match;
  - `pre_logits`: kept if the new model has that layer, dropped if not;
  - 1-D learned position embeddings and relative position biases: resized to the new patch `grid` when it
    differs;
  - everything else must match exactly; any mismatch raises naming the parameter and both shapes, so a
    half-loaded model is never trained.
  """
  pretrained = flatten(pretrained)
  target = flatten(init_params)
  scanned = models.SCANNED_BLOCK in init_params.get('Transformer', {})
  posemb_key = '/'.join(POSEMB_PATH)
  out, problems = {}, []
  for key, init_value in target.items():
    if key.startswith('head/') and not (keep_head and key in pretrained
                                         and pretrained[key].shape == init_value.shape):
      out[key] = init_value
      continue
    if key not in pretrained:
      problems.append(f'{key}: missing from the checkpoint (the model expects {init_value.shape})')
      continue
    value = pretrained[key]
    if key == posemb_key and value.shape != init_value.shape:
      value = resize_posemb(value, grid, num_prefix_tokens)
    if key.endswith('/relative_position_bias') and value.shape != init_value.shape:
      value = resize_relative_bias(value, grid)
    if value.shape != init_value.shape:
      problems.append(f'{key}: checkpoint {value.shape} vs model {init_value.shape}')
      continue
    out[key] = value.astype(init_value.dtype)
  # Dropped on purpose: the pretraining head, and masked patch prediction's [mask] embedding and colour head.
  dropped = ('pre_logits/', 'head/', 'mask_token', 'mpp_head/')
  unused = sorted(k for k in pretrained if k not in target and not k.startswith(dropped))
  problems += [f'{key}: in the checkpoint, not in the model' for key in unused]
  if problems:
    raise CheckpointError('The checkpoint does not fit the model (is it another variant?):\n  ' +
                          '\n  '.join(problems[:20]) + (f'\n  ... and {len(problems) - 20} more'
                                                        if len(problems) > 20 else ''))
  params = unflatten(out)
  return models.stack_layers(params) if scanned else params
