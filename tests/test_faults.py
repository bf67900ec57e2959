"""Faults a long run meets, injected for real into the main job: damaged checkpoints, a lost config record,
two jobs on one workdir, kill -9 during saves, a full disk, divergence, bad input. Each must be detected and
reported in a line; none may resume silently from bad data; the last good checkpoint stays usable; a run that
can recover ends with the parameters of an uninterrupted one. The table of these faults: docs/faults.md."""
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REFERENCE_FLAGS, REFERENCE_STEPS, ROOT, run_main
import tolerances
from vit_jax import checkpoints
from vit_jax import errors
from vit_jax import workdir_lock

STEPS = REFERENCE_STEPS
EVERY_20 = ('--config.checkpoint_every_steps=20',)


def _flags(data_dir, *extra):
  """The reference run's flags, checkpointing at the config's default interval unless `extra` says so."""
  flags = tuple(f for f in REFERENCE_FLAGS if not f.startswith('--config.checkpoint_every_steps'))
  return (*flags, f'--config.data_dir={data_dir}', *extra)


@pytest.fixture
def reference(reference_run):
  """An uninterrupted run (checkpoints 20, 40, 60); its workdir is copied before each fault."""
  return reference_run


def _copy(reference, tmp_path, name='run'):
  target = tmp_path / name
  shutil.copytree(reference, target)
  return target


def _steps(workdir):
  return sorted(int(p) for p in os.listdir(os.path.join(workdir, 'checkpoints')) if p.isdigit())


def _assert_same_final_params(workdir, reference):
  ours, theirs = checkpoints.restore_params(str(workdir), STEPS, ema=False)[0], checkpoints.restore_params(
      str(reference), STEPS, ema=False)[0]
  tolerances.assert_close(ours, theirs, tolerances.RESUMED_RUN, 'parameters')


def _assert_one_line_error(result):
  """A user error: exit status 2, one 'Error:' message, no traceback."""
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  return re.search(r'^Error: (.*)$', result.stderr, re.M)[1]


def _largest_data_file(step_dir):
  return max(glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True), key=os.path.getsize)


def _flip_bytes(path, fraction, count=64):
  data = bytearray(open(path, 'rb').read())
  start = int(len(data) * fraction)
  for i in range(start, min(start + count, len(data))):
    data[i] ^= 0x5A
  with open(path, 'wb') as f:
    f.write(bytes(data))


def _truncate(path):
  os.truncate(path, os.path.getsize(path) // 2)


def _state_of_step_40(step_dir):
  """Files that read fine but are not what this step wrote: the state of the step before, moved in."""
  shutil.rmtree(os.path.join(step_dir, 'state'))
  shutil.copytree(os.path.join(os.path.dirname(step_dir), '40', 'state'), os.path.join(step_dir, 'state'))


DAMAGE = {
    'truncated data file': lambda step_dir: _truncate(_largest_data_file(step_dir)),
    'flipped bytes, same size': lambda step_dir: _flip_bytes(_largest_data_file(step_dir), 0.5),
    'truncated metadata': lambda step_dir: _truncate(os.path.join(step_dir, 'state', '_METADATA')),
    'missing data file': lambda step_dir: os.remove(_largest_data_file(step_dir)),
    'missing integrity record': lambda step_dir: shutil.rmtree(os.path.join(step_dir, 'integrity')),
    'state of another step': _state_of_step_40,
}


@pytest.mark.slow
@pytest.mark.parametrize('damage', DAMAGE)
def test_a_damaged_checkpoint_is_detected_and_the_newest_intact_one_used(damage, reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  DAMAGE[damage](str(workdir / 'checkpoints' / str(STEPS)))
  with pytest.raises(checkpoints.CorruptCheckpoint, match=rf'checkpoint of step {STEPS} \(.*\) is not intact'):
    checkpoints.verify(str(workdir), STEPS)  # Every array, as a resuming run reads them.
  checkpoints.verify(str(workdir), 40)  # The one a run falls back to.


@pytest.mark.slow
def test_bytes_flipped_anywhere_are_caught_and_the_checksums_catch_what_reads_back_silently(reference, tmp_path):
  """Zstd frames that still decode after a flip (most of a frame of incompressible floats is stored raw) give
  other numbers without any read error: the recorded checksums are what catches those."""
  caught_by_checksums = 0
  for i, fraction in enumerate((0.1, 0.3, 0.5, 0.7, 0.9)):
    workdir = _copy(reference, tmp_path, f'run_{i}')
    _flip_bytes(_largest_data_file(str(workdir / 'checkpoints' / str(STEPS))), fraction)
    with pytest.raises(checkpoints.CorruptCheckpoint) as error:
      checkpoints.verify(str(workdir), STEPS)
    caught_by_checksums += 'differ from the checksums recorded' in str(error.value)
  assert caught_by_checksums >= 1


@pytest.mark.slow
def test_the_main_job_sets_a_damaged_checkpoint_aside_and_ends_where_an_uninterrupted_run_does(
    reference, tmp_path, data_dir):
  workdir = _copy(reference, tmp_path)
  for step in (STEPS, 40):  # Silent damage (numbers changed, files read fine) to the two newest.
    _flip_bytes(_largest_data_file(str(workdir / 'checkpoints' / str(step))), 0.5)
  refused = run_main(workdir, *_flags(data_dir, *EVERY_20), '--fallback_to_intact_checkpoint=false', check=False)
  assert f'The checkpoint of step {STEPS}' in _assert_one_line_error(refused)
  assert _steps(workdir) == [20, 40, STEPS]  # Refusing moves nothing.

  result = run_main(workdir, *_flags(data_dir, *EVERY_20))
  assert re.search(rf'checkpoint of step {STEPS} .* is not intact.*Moved to .*corrupt_checkpoints/{STEPS}-',
                   result.stderr)
  assert 'resuming from step 20 instead' in result.stderr
  assert 'Resumed from the checkpoint of step 20' in result.stderr
  assert sorted(p.split('-')[0] for p in os.listdir(workdir / 'corrupt_checkpoints')) == ['40', str(STEPS)]
  _assert_same_final_params(workdir, reference)

  for step in _steps(workdir):  # Nothing intact left: refused, naming each checkpoint, nothing moved.
    _truncate(_largest_data_file(os.path.join(workdir, 'checkpoints', str(step))))
  none_left = run_main(workdir, *_flags(data_dir, *EVERY_20), check=False)
  message = _assert_one_line_error(none_left)
  assert 'No intact checkpoint to resume from' in message and 'They are left in place' in none_left.stderr
  assert _steps(workdir) == [20, 40, STEPS]


@pytest.mark.slow
def test_a_lost_or_unreadable_run_record_is_refused_unless_adopted(reference, tmp_path, data_dir):
  workdir = _copy(reference, tmp_path)
  os.remove(workdir / 'config.json')
  lost = run_main(workdir, *_flags(data_dir, *EVERY_20), '--config.lr=0.5', check=False)
  assert 'config.json is missing' in _assert_one_line_error(lost) and '--adopt_config' in lost.stderr
  assert not os.path.exists(workdir / 'config.json')  # Not rewritten by the refused run.
  (workdir / 'config.json').write_text(open(reference / 'config.json').read()[:200])  # Cut short.
  cut = run_main(workdir, *_flags(data_dir, *EVERY_20), check=False)
  assert 'config.json is unreadable' in _assert_one_line_error(cut)
  adopted = run_main(workdir, *_flags(data_dir, *EVERY_20), '--adopt_config')
  assert 'adopting the given config' in adopted.stderr
  assert json.load(open(workdir / 'config.json'))['lr'] == 2e-3  # The record is whole again.


def _start(workdir, flags):
  return subprocess.Popen([sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}', *flags], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, process, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    assert process.poll() is None, f'the run ended early:\n{process.stderr.read()[-3000:]}'
    assert time.time() < deadline, 'timed out'
    time.sleep(0.02)


@pytest.mark.slow
def test_a_second_job_on_a_workdir_in_use_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path, data_dir):
  workdir = tmp_path / 'shared'
  flags = _flags(data_dir, '--config.total_steps=3000', '--config.checkpoint_every_steps=500')
  first = _start(workdir, flags)
  lock_file = workdir / workdir_lock.LOCK_FILE
  _wait_for(lambda: os.path.exists(lock_file) and os.path.getsize(lock_file) > 0, first)
  second = run_main(workdir, *flags, check=False)
  message = _assert_one_line_error(second)
  assert f'is in use by another run (pid {first.pid} on host' in message
  first.send_signal(signal.SIGKILL)
  first.wait()
  assert os.path.exists(lock_file)  # Left behind by the killed run, but no longer locked by anyone.
  # A shorter run (total_steps may differ on resume; the killed one saved nothing anyway).
  third = run_main(workdir, *_flags(data_dir, '--config.total_steps=20', '--config.checkpoint_every_steps=500'),
                   check=False)
  assert third.returncode == 0, third.stderr[-3000:]
  assert f'Took over {lock_file} from a run that ended without releasing it (pid {first.pid}' in third.stderr
  assert not os.path.exists(lock_file)  # Released on exit.


@pytest.mark.slow
def test_kill_9_or_two_ctrl_c_during_saves_lose_nothing(reference, tmp_path, data_dir):
  """A checkpoint every step, so that a save is nearly always in flight; killed three times at random
  moments after fresh progress, stopped once by two Ctrl-Cs, then left to finish."""
  workdir = tmp_path / 'killed'
  flags = _flags(data_dir, '--config.checkpoint_every_steps=1')
  rng = random.Random(17)
  kills_during_a_save = 0
  for _ in range(3):
    before = _steps(workdir)[-1] if os.path.isdir(workdir / 'checkpoints') and _steps(workdir) else 0
    process = _start(workdir, flags)
    _wait_for(lambda: os.path.isdir(workdir / 'checkpoints') and _steps(workdir) and _steps(workdir)[-1] > before,
              process)
    time.sleep(rng.uniform(0.0, 0.3))
    process.send_signal(signal.SIGKILL)
    process.wait()
    newest = _steps(workdir)[-1]
    in_flight = [p for p in glob.glob(str(workdir / 'checkpoints' / '*.orbax-checkpoint-tmp*'))
                 if int(os.path.basename(p).split('.')[0]) > newest]
    kills_during_a_save += bool(in_flight)
    assert newest < STEPS
    _, step = checkpoints.restore_params(str(workdir), newest)  # The newest complete checkpoint reads, verified.
    assert step == newest
  assert kills_during_a_save >= 1
  # Two Ctrl-Cs at once: the second stops the run at once, a save in flight or not; the newest committed
  # checkpoint reads, verified.
  before = _steps(workdir)[-1]
  process = _start(workdir, flags)
  _wait_for(lambda: _steps(workdir)[-1] > before, process)
  process.send_signal(signal.SIGINT)
  time.sleep(0.2)  # Two signals at once would reach Python's handler as one.
  process.send_signal(signal.SIGINT)
  stderr = process.communicate(timeout=120)[1]
  assert process.returncode == errors.INTERRUPTED_EXIT_STATUS, stderr[-3000:]
  # The message is the last word: nothing of the interpreter's shutdown (a save's threads torn down) follows.
  assert stderr.splitlines()[-1].startswith('Stopped at once by Ctrl-C') and 'Traceback' not in stderr, (
      stderr[-3000:])
  newest = _steps(workdir)[-1]
  assert checkpoints.restore_params(str(workdir), newest)[1] == newest
  result = run_main(workdir, *flags)
  assert re.search(r'Resumed from the checkpoint of step \d+ in .* \(checksums verified\)', result.stderr)
  _assert_same_final_params(workdir, reference)


@pytest.mark.slow
@pytest.mark.parametrize('signum, status, stopped', [
    (signal.SIGTERM, errors.PREEMPTED_EXIT_STATUS, r'Stopped by SIGTERM \(preemption\)'),
    (signal.SIGINT, errors.INTERRUPTED_EXIT_STATUS, r'Stopped by Ctrl-C')],  # A Ctrl-C: a preemption asked for.
    ids=['sigterm', 'ctrl_c'])
def test_sigterm_or_ctrl_c_saves_a_checkpoint_of_the_current_step_and_the_rerun_ends_where_an_uninterrupted_run_does(
    reference, tmp_path, data_dir, signum, status, stopped):
  workdir = tmp_path / 'preempted'
  process = _start(workdir, _flags(data_dir, *EVERY_20))
  # Once the run holds its workdir it watches for the signal; sent now, it lands before or during compilation
  # (later, the 60 tiny steps could be over before it arrives).
  lock_file = workdir / workdir_lock.LOCK_FILE
  _wait_for(lambda: os.path.exists(lock_file) and os.path.getsize(lock_file) > 0, process)
  process.send_signal(signum)
  stderr = process.communicate(timeout=120)[1]
  assert process.returncode == status, stderr[-3000:]
  match = re.search(stopped + r' at step (\d+) of 60, after saving its checkpoint.* Rerun the same command to '
                    r'resume', stderr)
  assert match, stderr[-3000:]
  assert int(match[1]) in _steps(workdir) and 'Traceback' not in stderr
  result = run_main(workdir, *_flags(data_dir, *EVERY_20))
  assert f'Resumed from the checkpoint of step {match[1]}' in result.stderr
  _assert_same_final_params(workdir, reference)


def _mount_small_disk(path, size):
  """A tmpfs of `size` at `path` (needs root, as in CI); False where mounting is not allowed."""
  os.makedirs(path, exist_ok=True)
  return subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                        capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_the_last_checkpoint_intact_and_it_resumes_once_freed(
    reference, tmp_path, data_dir):
  disk = tmp_path / 'disk'
  one_checkpoint = sum(os.path.getsize(p) for p in glob.glob(str(reference / 'checkpoints' / '20' / '**'),
                                                             recursive=True) if os.path.isfile(p))
  if not _mount_small_disk(disk, f'{int(1.6 * one_checkpoint) // 1024}k'):
    pytest.skip('mounting a tmpfs needs root (CI runs as root)')
  try:
    # The compilation cache off: beside the workdir, it would fill this small disk before any checkpoint.
    full = run_main(disk / 'run', *_flags(data_dir, *EVERY_20), '--config.compilation_cache_dir=', check=False)
    message = _assert_one_line_error(full)
    assert 'Writing a checkpoint into' in message and 'No space left on device' in message
    assert 'the newest is step 20' in message
    assert _steps(disk / 'run') == [20]
    freed = tmp_path / 'freed'  # The user makes room: here, the workdir moves to a disk with space.
    shutil.copytree(disk / 'run', freed)
  finally:
    subprocess.run(['umount', str(disk)], check=True)
  result = run_main(freed, *_flags(data_dir, *EVERY_20))
  assert 'Resumed from the checkpoint of step 20' in result.stderr
  _assert_same_final_params(freed, reference)


@pytest.mark.slow
def test_a_diverging_run_stops_and_never_replaces_finite_checkpoints(tmp_path, data_dir):
  """The loss is logged every 20 steps but checkpoints come every 5: each checkpoint is checked finite at its
  own step, so the NaN ones of a diverging run are never written and the finite ones are never rotated out."""
  workdir = tmp_path / 'diverged'
  result = run_main(workdir, *_flags(data_dir, '--config.lr=1e3', '--config.checkpoint_every_steps=5'),
                    check=False)
  message = _assert_one_line_error(result)
  match = re.search(r'Training diverged: .* at step (\d+)\. Nothing non-finite was saved: (.*)', message)
  assert match, message
  assert 'gradient clipping is already on (global norm 1.0): lower the learning rate (now 1000.0)' in message
  steps = _steps(workdir)
  assert steps and steps[-1] < int(match[1]) and f'step {steps[-1]} in' in match[2]
  for step in steps:
    params, _ = checkpoints.restore_params(str(workdir), step, ema=False)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params)), step


@pytest.mark.slow
def test_bad_input_fails_in_one_line_before_any_work(tmp_path, data_dir):
  start = time.perf_counter()
  bad = run_main(tmp_path / 'a', *_flags(f'{tmp_path}/untouched', '--config.lr=-1e-3', '--config.warmup_steps=60',
                                         '--config.weight_decay=-1'), check=False)
  seconds = time.perf_counter() - start
  message = _assert_one_line_error(bad)
  for part in ('config.lr=-0.001', 'warmup_steps=60 is not below the 60 training steps',
               'weight_decay=-1.0 must not be negative'):
    assert part in bad.stderr, part
  assert message.startswith('Invalid config')
  assert not os.path.exists(tmp_path / 'a') and not os.path.exists(tmp_path / 'untouched')
  assert seconds < 60, seconds  # Before TensorFlow, datasets and compilation (generous for a loaded CI host).
  unknown = run_main(tmp_path / 'b', *_flags(data_dir, '--config.dataset=no_such_dataset'), check=False)
  assert 'Unknown dataset' in _assert_one_line_error(unknown)
  assert len(unknown.stderr.splitlines()) < 40  # Not tfds' catalogue of every dataset it knows.
  verbose = run_main(tmp_path / 'c', *_flags(data_dir, '--config.lr=-1e-3'), '--verbose', check=False)
  assert 'Traceback' in verbose.stderr and 'ConfigError' in verbose.stderr


@pytest.mark.slow
def test_a_workdir_or_data_dir_that_cannot_be_written_is_named_in_one_line(tmp_path, data_dir):
  afile = tmp_path / 'afile'
  afile.write_text('not a folder')
  message = _assert_one_line_error(run_main(afile, *_flags(data_dir), check=False))
  assert f'--workdir={afile} is a file, not a folder' in message
  read_only = tmp_path / 'read_only'
  read_only.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'ro,size=1m', 'tmpfs', str(read_only)]).returncode != 0:
    pytest.skip('mounting a read-only tmpfs needs root (CI runs as root)')
  try:
    message = _assert_one_line_error(run_main(read_only / 'run', *_flags(data_dir), check=False))
    assert f'Cannot write into --workdir={read_only}/run: Read-only file system' in message
    message = _assert_one_line_error(run_main(tmp_path / 'run', *_flags(str(read_only / 'tfds')), check=False))
    assert f"Cannot build the dataset 'embedded_digits' into {read_only}/tfds: Read-only file system" in message
  finally:
    subprocess.run(['umount', str(read_only)], check=True)


@pytest.mark.slow
def test_pretrained_weights_holding_nan_are_refused_at_load_naming_the_array(tmp_path, reference, data_dir):
  params, _ = checkpoints.restore_params(str(reference), STEPS)
  scale = np.array(params['Transformer']['encoder_norm']['scale'])
  scale[3] = np.nan
  params['Transformer']['encoder_norm']['scale'] = scale
  npz = tmp_path / 'nan.npz'
  checkpoints.save_npz(params, str(npz))
  assert os.stat(npz).st_mode & 0o777 == 0o666 & ~_umask()  # Normal permissions, not mkstemp's 0600.
  result = run_main(tmp_path / 'ft', *_flags(data_dir, f'--config.init_from={npz}'), check=False)
  message = _assert_one_line_error(result)
  assert 'holds non-finite values (NaN or inf) in 1 array(s): Transformer/encoder_norm/scale' in message


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_the_workdir_lock_names_its_holder_and_is_free_once_released(tmp_path):
  with workdir_lock.WorkdirLock(str(tmp_path)):
    with pytest.raises(errors.WorkdirError, match=rf'in use by another run \(pid {os.getpid()} on host'):
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert not os.path.exists(tmp_path / workdir_lock.LOCK_FILE)
  with workdir_lock.WorkdirLock(str(tmp_path)):
    assert json.load(open(tmp_path / workdir_lock.LOCK_FILE))['pid'] == os.getpid()


def _damage_flip(folder):
  train_file, = glob.glob(os.path.join(folder, '*-train.tfrecord-*'))
  data = bytearray(open(train_file, 'rb').read())
  data[1000:1064] = bytes(b ^ 0xFF for b in data[1000:1064])
  open(train_file, 'wb').write(bytes(data))


def _damage_cut(folder):
  train_file, = glob.glob(os.path.join(folder, '*-train.tfrecord-*'))
  os.truncate(train_file, os.path.getsize(train_file) // 2)


def _damage_delete(folder):
  train_file, = glob.glob(os.path.join(folder, '*-train.tfrecord-*'))
  os.remove(train_file)


def _damage_info(folder):
  os.truncate(os.path.join(folder, 'dataset_info.json'), 300)


@pytest.mark.slow
@pytest.mark.parametrize('damage, what', [(_damage_flip, 'a record is altered or cut'),
                                          (_damage_cut, 'a record is altered or cut'),
                                          (_damage_delete, 'a file is missing'),
                                          (_damage_info, 'its metadata cannot be read')],
                         ids=['bytes flipped', 'data file cut', 'data file deleted', 'dataset_info.json cut'])
def test_a_damaged_dataset_is_named_with_how_to_rebuild_it(tmp_path, data_dir, damage, what):
  short = ('--config.total_steps=10', '--config.warmup_steps=2')
  built = os.path.join(data_dir, 'embedded_digits')
  if not os.path.isdir(built):  # Built by any earlier run of the session; else by this one.
    run_main(tmp_path / 'build', *_flags(data_dir, *short))
  copy = tmp_path / 'tfds'
  shutil.copytree(built, copy / 'embedded_digits')
  version, = glob.glob(str(copy / 'embedded_digits' / '*'))
  damage(version)
  result = run_main(tmp_path / 'run', *_flags(str(copy), *short), check=False)
  message = _assert_one_line_error(result)
  assert f"The prepared dataset 'embedded_digits' is damaged: {what}" in message
  assert f'Delete {copy}/embedded_digits and rerun' in message
  if damage is _damage_flip:  # The advice works.
    shutil.rmtree(copy / 'embedded_digits')
    assert 'Final test accuracy' in run_main(tmp_path / 'rerun', *_flags(str(copy), *short)).stdout


def test_out_of_memory_names_the_batch_size_and_the_settings_that_lower_it(tmp_path, data_dir):
  # An MLP kernel of 32 TiB: one allocation no host has, refused at once (nothing is touched first).
  result = run_main(tmp_path / 'run', *_flags(data_dir, '--config.model.mlp_dim=68719476736'), check=False)
  message = _assert_one_line_error(result)
  assert 'Out of memory on the CPU devices' in message and 'RESOURCE_EXHAUSTED' in message
  for part in ('config.batch_size=32 (32 per device on 1)', '--config.batch_size=16', '--config.accum_steps=2',
               '--config.model.remat=True', '--config.dtype=bfloat16', '--config.mesh.fsdp'):
    assert part in message, part


@pytest.mark.slow
def test_a_run_resumes_with_micro_batches_and_recomputed_activations_to_the_same_parameters(tmp_path, data_dir):
  # Moving to a slice with less memory per device: the same steps, computed in two micro-batches, with the
  # activations recomputed in the backward pass. SGD: its update moves with the gradient's rounding, where
  # Adam's normalised update lets the two runs' rounding grow apart over the steps, past a per-step bound.
  sgd = _flags(data_dir, *EVERY_20, '--config.total_steps=40', '--config.optimizer=sgd', '--config.lr=0.05')
  straight = tmp_path / 'straight'
  run_main(straight, *sgd)
  run = _copy(straight, tmp_path)
  shutil.rmtree(run / 'checkpoints' / '40')
  resumed = run_main(run, *sgd, '--config.accum_steps=2', '--config.model.remat=true')
  assert 'Resumed from the checkpoint of step 20' in resumed.stderr
  from vit_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_workdir_config(str(straight))
  ours, theirs = checkpoints.restore_params(str(run), 40, ema=False)[0], checkpoints.restore_params(
      str(straight), 40, ema=False)[0]
  # Each of the 20 resumed steps sums its batch's gradients in another order (two partial sums).
  tolerances.assert_close(ours, theirs, tolerances.training_tolerance(config, 20, channels=1), 'parameters')
  tolerances.assert_differ(ours, theirs, 0.0, 'parameters')  # Computed another way indeed: not bit-equal.
