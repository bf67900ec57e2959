"""A workdir in a bucket, end to end, against a real GCS emulator (gcp-storage-emulator, started here on
127.0.0.1): the main job trains, is killed, resumes to the parameters of an uninterrupted run, refuses a changed
config; TensorBoard events, `export`, `analyze` and `init_from` read and write `gs://` paths.

The emulator runs through `gcs_emulator.py`, which adds the generation header real GCS sends on downloads.
The clients are pointed at it the way each supports: etils.epath (config.json, npz, figures, events,
orbax's folders) through its fsspec backend (`EPATH_USE_TF=false`, gcsfs reads STORAGE_EMULATOR_HOST), orbax's
arrays through TensorStore (TENSORSTORE_GCS_HTTP_URL). The bucket's contents are checked through the
emulator's JSON API directly, not through the code under test.
"""
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
from etils.epath import gpath
import pytest

from conftest import REFERENCE_FLAGS, REFERENCE_STEPS, ROOT, run_main
import tolerances
from vit_jax import checkpoints
from vit_jax import paths

BUCKET = 'vit-jax-test'
STEPS = REFERENCE_STEPS
TINY = REFERENCE_FLAGS


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Emulator:
  """The GCS emulator on a port of its own; `on_disk`: the bucket kept in a folder, so that `stop()` and
  `start()` again make a storage outage that loses nothing."""

  def __init__(self, log_dir, on_disk=False):
    self.port = _free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.log_path = log_dir / 'emulator.log'
    self.log = open(self.log_path, 'a')
    self.data_dir = str(log_dir / 'bucket') if on_disk else None
    self.server = None

  def start(self):
    self.server = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'tests', 'gcs_emulator.py'), '127.0.0.1', str(self.port), BUCKET,
         *([self.data_dir] if self.data_dir else [])], stdout=self.log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while True:
      try:
        urllib.request.urlopen(f'{self.url}/storage/v1/b/{BUCKET}', timeout=2).read()
        return
      except OSError:
        assert self.server.poll() is None and time.time() < deadline, (
            f'the GCS emulator did not start:\n{self.log_path.read_text()[-3000:]}')
        time.sleep(0.2)

  def stop(self):
    self.server.terminate()
    self.server.send_signal(signal.SIGCONT)  # A frozen one takes the SIGTERM when it runs again.
    self.server.wait()

  def client_env(self):
    """What points every client at it (in a subprocess's environment, or this one's)."""
    return {'STORAGE_EMULATOR_HOST': self.url, 'TENSORSTORE_GCS_HTTP_URL': self.url, 'EPATH_USE_TF': 'false',
            'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator'}


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """The emulator's URL, with this process's environment pointing every client at it (restored after)."""
  emulator = Emulator(tmp_path_factory.mktemp('gcs'))
  emulator.start()
  env = emulator.client_env()
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  gpath._is_tf_installed.cache_clear()  # epath reads EPATH_USE_TF once per process (cached).
  yield emulator.url
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key)
    else:
      os.environ[key] = value
  gpath._is_tf_installed.cache_clear()
  emulator.stop()
  emulator.log.close()


def _objects(url, prefix):
  """Names of the bucket's objects under `prefix`, from the emulator's JSON API."""
  query = urllib.parse.urlencode({'prefix': prefix})
  listing = json.load(urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}/o?{query}', timeout=10))
  return sorted(item['name'] for item in listing.get('items', []))


def _object(url, name):
  return urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe="")}?alt=media',
                                timeout=10).read()


def _committed_steps(url, run):
  """Steps whose checkpoint orbax committed (on GCS it writes in place, then `<step>/commit_success.txt`)."""
  prefix = f'{run}/checkpoints/'
  names = [name[len(prefix):].split('/') for name in _objects(url, prefix)]
  return sorted(int(parts[0]) for parts in names if parts[1:] == ['commit_success.txt'])


def test_atomic_writes_leave_nothing_behind_when_interrupted(gcs, tmp_path):
  for base in (str(tmp_path), f'gs://{BUCKET}/atomic'):
    path = paths.join(base, 'record.json')
    paths.write_text(path, 'old')
    with pytest.raises(RuntimeError):
      with paths.atomic_writer(path, 'w') as f:
        f.write('half of the new')
        raise RuntimeError('interrupted')
    assert paths.read_text(path) == 'old'
    assert paths.listdir(base) == ['record.json']
  assert _object(gcs, 'atomic/record.json') == b'old'


@pytest.mark.slow
def test_a_bucket_workdir_trains_is_killed_resumes_and_serves_export_analyze_and_init_from(gcs, tmp_path, data_dir,
                                                                                           reference_run):
  flags = (*TINY, f'--config.data_dir={data_dir}')
  reference = reference_run

  run, workdir = 'runs/killed', f'gs://{BUCKET}/runs/killed'
  process = subprocess.Popen([sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}', *flags], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not _committed_steps(gcs, run):
    assert process.poll() is None, f'the run ended early:\n{process.stderr.read()[-3000:]}'
    assert time.time() < deadline, 'no checkpoint reached the bucket'
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = _committed_steps(gcs, run)
  assert killed_at and killed_at[-1] < STEPS, killed_at
  assert 'config.json' in [name.split('/')[-1] for name in _objects(gcs, f'{run}/')]

  resumed = run_main(workdir, *flags)
  assert f'Resumed from the checkpoint of step {killed_at[-1]}' in resumed.stderr, resumed.stderr[-3000:]
  assert _committed_steps(gcs, run)[-1] == STEPS
  ours = checkpoints.restore_params(workdir, STEPS, ema=False)[0]
  theirs = checkpoints.restore_params(str(reference), STEPS, ema=False)[0]
  tolerances.assert_close(ours, theirs, tolerances.RESUMED_RUN, 'parameters')
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))  # The old bug: a local folder named after the scheme.

  # The resume guard reads the record from the bucket.
  changed = run_main(workdir, *flags, '--config.lr=0.5', check=False)
  assert changed.returncode == 2 and 'holds checkpoints of a run with another config (lr: ' in changed.stderr

  # TensorBoard events of both attempts, readable as written.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  events = [name for name in _objects(gcs, f'{run}/') if '.tfevents.' in name]
  assert len(events) == 2, events
  logged = set()
  for name in events:
    local = tmp_path / os.path.basename(name)
    local.write_bytes(_object(gcs, name))
    logged |= {(v.tag, e.step) for e in tf.compat.v1.train.summary_iterator(str(local)) for v in e.summary.value}
  assert {('train/loss', step) for step in (20, 40, 60)} <= logged

  exported = f'gs://{BUCKET}/exports/killed.npz'
  subprocess.run([sys.executable, '-m', 'vit_jax.export', f'--workdir={workdir}', f'--out={exported}'], cwd=ROOT,
                 check=True, capture_output=True, text=True, timeout=300)
  with np.load(io.BytesIO(_object(gcs, 'exports/killed.npz'))) as npz:
    assert npz['head/kernel'].shape == ours['head']['kernel'].shape
    np.testing.assert_array_equal(npz['head/kernel'], ours['head']['kernel'])
  np.testing.assert_array_equal(checkpoints.load_pretrained(exported)['head']['bias'], ours['head']['bias'])

  figures = f'gs://{BUCKET}/figures'
  subprocess.run([sys.executable, '-m', 'vit_jax.analyze', f'--workdir={workdir}', f'--out={figures}',
                  '--num_images=8'], cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
  pngs = [name for name in _objects(gcs, 'figures/') if name.endswith('.png')]
  assert len(pngs) == 4 and all(_object(gcs, name).startswith(b'\x89PNG') for name in pngs)
  assert 'figures/analysis.json' in _objects(gcs, 'figures/')

  tuned = run_main(f'gs://{BUCKET}/runs/tuned', *flags, '--config.total_steps=20', f'--config.init_from={workdir}')
  assert f'Initialised from {workdir}' in tuned.stderr
  assert _committed_steps(gcs, 'runs/tuned') == [20]


def test_gcsfs_warnings_repeated_per_request_are_shown_once():
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from vit_jax import errors  # pylint: disable=g-import-not-at-top
  handler = logging.get_absl_handler()
  before = list(handler.filters)
  errors.quiet_library_logs()
  try:
    record = lambda message, level=py_logging.WARNING: py_logging.LogRecord(
        'gcsfs', level, '/site-packages/gcsfs/core.py', 1, message, (), None)
    bucket_type = 'Could not determine bucket type for vit-jax-test: credentials\nTraceback ...'
    assert handler.filter(record(bucket_type)) and not handler.filter(record(bucket_type))  # Once.
    assert handler.filter(record('Another warning'))  # Each distinct warning still shows.
    assert not handler.filter(record('Reading gs://b/x', py_logging.INFO))  # Chatter dropped.
    shown = record(bucket_type.replace('vit-jax-test', 'other'))
    assert handler.filter(shown) and shown.msg == 'Could not determine bucket type for other: credentials'
  finally:
    handler.filters[:] = before


def _wait_for(condition, process, log_path, what, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    assert process.poll() is None, f'the run ended before {what}:\n{log_path.read_text()[-3000:]}'
    assert time.time() < deadline, f'no {what} within {timeout} s:\n{log_path.read_text()[-3000:]}'
    time.sleep(0.05)


@pytest.mark.slow
def test_storage_frozen_at_the_start_and_down_mid_run_is_waited_out_said_and_loses_nothing(tmp_path, data_dir,
                                                                                           reference_run):
  emulator = Emulator(tmp_path, on_disk=True)
  emulator.start()  # Creates the bucket, on disk.
  emulator.server.send_signal(signal.SIGSTOP)  # Frozen at the start: connections are taken, never answered.
  run, workdir = 'runs/outage', f'gs://{BUCKET}/runs/outage'
  log_path = tmp_path / 'run.log'
  with open(log_path, 'w') as log:
    process = subprocess.Popen([sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}', *TINY,
                                f'--config.data_dir={data_dir}'], cwd=ROOT, env={**os.environ,
                                **emulator.client_env()}, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
      _wait_for(lambda: 'the start of the run waits for it' in log_path.read_text(), process, log_path,
                'word of the storage being down at the start')
      emulator.server.send_signal(signal.SIGCONT)
      # Mid-run, at a point the run cannot have passed: paused as it logs step 40 (its checkpoints of steps 40
      # and 60 and their events still to write), storage goes down, and the run goes on without it.
      _wait_for(lambda: f'step 40/{STEPS}' in log_path.read_text(), process, log_path, 'step 40', timeout=600)
      process.send_signal(signal.SIGSTOP)
      emulator.stop()
      process.send_signal(signal.SIGCONT)
      # Down until a write has failed (the storage libraries' own retries, ~40 s, ran out), then back.
      _wait_for(lambda: 'trying again once it answers' in log_path.read_text(), process, log_path,
                'failed write waiting for storage')
      emulator.start()
      assert process.wait(timeout=600) == 0, log_path.read_text()[-5000:]
    finally:
      if process.poll() is None:
        process.kill()
      emulator.stop()
  text = log_path.read_text()
  assert 'Traceback' not in text, text[-5000:]
  down = [line for line in text.splitlines() if 'does not answer' in line]
  again = [line for line in text.splitlines() if 'answers again' in line]
  assert any('the start of the run' in line and 'TimeoutError' in line for line in down), down + again
  assert any('the start of the run' in line for line in again), down + again
  # Mid-run: what waited is named, and that it went on.
  mid_run = [line for line in again if 'the start of the run' not in line]
  assert mid_run and all('the checkpoint of step' in line or 'TensorBoard events' in line for line in mid_run), (
      down + again)
  assert 'Final test accuracy' in text

  emulator.start()  # Read through the code under test: the run's final parameters are an uninterrupted run's.
  try:
    with pytest.MonkeyPatch.context() as patch:
      for key, value in emulator.client_env().items():
        patch.setenv(key, value)
      gpath._is_tf_installed.cache_clear()
      assert _committed_steps(emulator.url, run)[-1] == STEPS
      ours = checkpoints.restore_params(workdir, STEPS, ema=False)[0]
    gpath._is_tf_installed.cache_clear()
  finally:
    emulator.stop()
  theirs = checkpoints.restore_params(str(reference_run), STEPS, ema=False)[0]
  tolerances.assert_close(ours, theirs, tolerances.RESUMED_RUN, 'parameters')


def test_storage_that_never_answers_ends_in_one_line_saying_what_is_safe(tmp_path, data_dir):
  nothing_there = f'http://127.0.0.1:{_free_port()}'
  env = {'STORAGE_EMULATOR_HOST': nothing_there, 'TENSORSTORE_GCS_HTTP_URL': nothing_there,
         'EPATH_USE_TF': 'false', 'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator'}
  started = time.time()
  result = run_main(f'gs://{BUCKET}/runs/never', *TINY, f'--config.data_dir={data_dir}',
                    '--config.storage_patience_minutes=0.1', env=env, check=False)
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  error = [line for line in result.stderr.splitlines() if line.startswith('Error:')]
  assert len(error) == 1, result.stderr[-3000:]
  assert f'Storage of gs://{BUCKET}/runs/never has not answered for' in error[0]
  assert 'cannot be counted while storage does not answer' in error[0] and 'Rerun the same command' in error[0]
  assert 'until' in result.stderr and 'storage_patience_minutes' in result.stderr  # The wait was said.
  assert time.time() - started < 60  # Patience 6 s, then probes that are refused at once.
