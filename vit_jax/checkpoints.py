"""Checkpoints: the train state in a workdir (orbax), parameters in the layout of the published ViT checkpoints
(`.npz` import and export), and pretrained weights loaded into a model built for a new task (new head,
resized position embeddings).

A workdir holds `config.json` (`config_lib`) and `checkpoints/<step>/` (the orbax train state: step,
parameters, optimizer state, moving average).

A published file is a flat `np.savez` of arrays keyed by '/'-joined parameter paths, e.g.
`Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel`; our models use the same names, so
a file loads by unflattening it. Scanned models (`scan=True`) are converted to the per-layer layout on export.
"""
import os
import tempfile
import zipfile
from typing import Any, Dict, Tuple

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
import scipy.ndimage

from vit_jax import models

POSEMB_PATH = ('Transformer', 'posembed_input', 'pos_embedding')
CHECKPOINT_DIR = 'checkpoints'  # Inside a workdir.


class CheckpointError(ValueError):
  """A checkpoint that cannot be used: unreadable, or not matching the model; the message says which array."""


def flatten(params: Any) -> Dict[str, np.ndarray]:
  """Nested parameters -> {'a/b/c': numpy array}, in the published per-layer layout."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(models.unstack_layers(params)), sep='/')
  return {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}


def unflatten(flat: Dict[str, np.ndarray]) -> Dict[str, Any]:
  return flax.traverse_util.unflatten_dict(dict(flat), sep='/')


def save_npz(params: Any, path: str) -> None:
  """Writes `params` as a published-layout `.npz`; written to a temporary file and renamed, so a crash
  leaves either the old file or the complete new one."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  handle, tmp_path = tempfile.mkstemp(suffix='.npz.tmp', dir=directory)
  try:
    with os.fdopen(handle, 'wb') as f:
      np.savez(f, **flatten(params))
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise


def load_npz(path: str) -> Dict[str, Any]:
  """A published-layout `.npz` -> nested numpy parameters. Every array is read (and CRC-checked) here, so a
  corrupt or truncated file fails now, naming the file, not halfway through building a model."""
  if not os.path.exists(path):
    raise CheckpointError(f'Checkpoint file {path!r} does not exist.')
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {key: data[key] for key in data.files}
  except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as e:
    raise CheckpointError(f'Cannot read {path!r} as a .npz checkpoint ({type(e).__name__}: {e}); the file is '
                          f'corrupt or truncated: download or export it again.') from e
  if not flat:
    raise CheckpointError(f'{path!r} holds no arrays.')
  return unflatten(flat)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINT_DIR)


def is_workdir(path: str) -> bool:
  """Whether `path` is a vit_jax.main workdir (with checkpoints), not a weights file."""
  return os.path.isdir(checkpoint_dir(path))


def train_state_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """The orbax manager of a workdir's train-state checkpoints, keeping the newest `keep`. Orbax writes each
  checkpoint to a temporary folder and renames it when complete: a crash mid-save leaves the previous one as
  the latest readable checkpoint."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def load_pretrained(source: str) -> Dict[str, Any]:
  """Pretrained parameters from a vit_jax workdir (its latest checkpoint) or a published-layout `.npz`."""
  if is_workdir(source):
    params, _ = restore_params(source)
    return params
  return load_npz(source)


def restore_params(workdir: str, step=None, ema=None):
  """The parameters of a workdir's checkpoint (latest by default), as numpy arrays on this host, whatever
  the mesh that wrote them. `ema`: the moving average of the parameters (`config.ema_decay` > 0) instead of
  the parameters; None: the average when the run kept one."""
  directory = checkpoint_dir(os.path.abspath(workdir))
  if not os.path.isdir(directory):
    raise CheckpointError(f'No checkpoints in {workdir!r}: expected a vit_jax.main workdir with '
                          f'a {CHECKPOINT_DIR}/ folder.')
  with ocp.CheckpointManager(directory, item_handlers=ocp.PyTreeCheckpointHandler()) as manager:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      raise CheckpointError(f'No checkpoint of step {step} in {directory}; it has {manager.all_steps()}.')
    metadata = dict(manager.item_metadata(step))
    has_ema = metadata.get('ema_params') is not None
    if ema and not has_ema:
      raise CheckpointError(f'The checkpoint of step {step} in {directory} has no moving average of the '
                            f'parameters (the run had config.ema_decay=0): use its parameters.')
    key = 'ema_params' if (has_ema if ema is None else ema) else 'params'
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    # Only the wanted parameters are read; the optimizer state stays on disk.
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata[key])
    state = manager.restore(step, args=ocp.args.PyTreeRestore(
        {key: target}, restore_args=ocp.checkpoint_utils.construct_restore_args({key: target}),
        partial_restore=True))
  return jax.tree.map(np.asarray, state[key]), step


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
