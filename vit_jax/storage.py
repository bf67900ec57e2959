"""Whether the object store behind a workdir answers, and what a run does while it does not.

Storage libraries retry on their own, silently (docs/faults.md): a short outage looks like a stalled run, a
long one like a failed write. Here a run waits for storage visibly (a line when it stops
answering, what waits, until when; a line when it answers again), and when it gives up says what is safe.

"Answers" means an HTTP answer of any status from the store's endpoint: an unauthorised request still shows
that the network and the service are up (for `gs://`; other schemes ask their library whether the path exists).
A local path always answers: its faults are OS errors, reported where they happen.
"""
import contextlib
import os
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Iterator, List, Optional, Tuple

from absl import logging
from etils import epath

from vit_jax import errors
from vit_jax import paths

PROBE_TIMEOUT_S = 10  # A frozen service accepts connections and never answers: this long counts as no answer.
FIRST_RETRY_S, LONGEST_RETRY_S = 2.0, 60.0  # Backoff between probes: doubling from the first to the longest.
STALL_REPORT_S = 10.0  # A storage call blocked this long is looked into (and said, if storage is down).


class StorageUnreachable(errors.UserError, ConnectionError):
  """The object store did not answer within the run's patience."""


def _gcs_endpoint() -> str:
  # gcsfs reads the same variable (the emulator, or a private endpoint).
  return os.environ.get('STORAGE_EMULATOR_HOST', 'https://storage.googleapis.com').rstrip('/')


def problem(path) -> Optional[str]:
  """None when the storage holding `path` answers; else what went wrong, in one line."""
  path = os.fspath(path)
  if not paths.is_url(path):
    return None
  if path.startswith('gs://'):
    bucket = path[len('gs://'):].split('/')[0]
    try:
      urllib.request.urlopen(f'{_gcs_endpoint()}/storage/v1/b/{bucket}', timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
      return None  # An answer, if a refusal (no credentials in the request): the service is up.
    except (OSError, ValueError) as e:  # URLError, timeouts, refused or reset connections.
      reason = getattr(e, 'reason', e)
      return errors.one_line(reason if isinstance(reason, BaseException) else e, 200)
    return None
  try:
    epath.Path(path).exists()
  except Exception as e:  # pylint: disable=broad-except  (whatever the scheme's library raises)
    return errors.one_line(e, 200)
  return None


def _clock(timestamp: float) -> str:
  return time.strftime('%H:%M:%S', time.localtime(timestamp))


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 60} min {seconds % 60} s' if seconds >= 60 else f'{seconds} s'


def wait_until_answering(path, *, what: str, patience_s: float, safe: Callable[[], str] = lambda: '',
                         since: Optional[float] = None) -> None:
  """Returns once the storage of `path` answers (at once if it does). While it does not: a warning naming
  it, the error, `what` waits and until when, repeated as the probes back off; then a line when it answers.
  After `patience_s` without an answer (counted from `since`, default now), raises StorageUnreachable with
  `safe()` (what is known to be safe, e.g. the newest committed checkpoint) and the advice to rerun."""
  error = problem(path)
  if error is None:
    return
  since = time.time() if since is None else since
  deadline = since + patience_s
  logging.warning('Storage of %s does not answer (%s) since %s; %s waits for it, trying again with backoff '
                  'until %s (config.storage_patience_minutes=%g).', path, error, _clock(since), what,
                  _clock(deadline), patience_s / 60)
  delay = FIRST_RETRY_S
  while True:
    time.sleep(max(0.0, min(delay, deadline - time.time())))
    error = problem(path)
    if error is None:
      logging.warning('Storage of %s answers again, after %s; %s goes on.', path, _duration(time.time() - since),
                      what)
      return
    if time.time() >= deadline:
      raise StorageUnreachable(
          f'Storage of {path} has not answered for {_duration(time.time() - since)} ({error}); gave up waiting '
          f'({what}). {safe()}Rerun the same command once it answers: the run resumes from its newest committed '
          f'checkpoint (or give a longer --config.storage_patience_minutes).')
    if delay >= LONGEST_RETRY_S:  # About once a minute.
      logging.warning('Storage of %s still does not answer after %s (%s); trying until %s.', path,
                      _duration(time.time() - since), error, _clock(deadline))
    delay = min(delay * 2, LONGEST_RETRY_S)


@contextlib.contextmanager
def reporting_stalls(path, what: str, after_s: float = STALL_REPORT_S) -> Iterator[List[float]]:
  """Runs the block (a call that writes to or reads from storage, which its library retries silently) while a
  thread watches: blocked longer than `after_s` with storage not answering, it says so, and says when storage
  answers again. Yields a list that receives the time it first found storage not answering. Local paths are
  not watched."""
  seen_down = []
  if not paths.is_url(path):
    yield seen_down
    return
  done = threading.Event()

  def watch():
    if done.wait(after_s):
      return
    error = problem(path)
    if error is None:
      return
    since = time.time()
    seen_down.append(since)
    logging.warning('Storage of %s does not answer (%s); %s waits: its library retries.', path, error, what)
    while not done.wait(FIRST_RETRY_S):
      if problem(path) is None:
        logging.warning('Storage of %s answers again, after about %s; %s goes on.', path,
                        _duration(time.time() - since + after_s), what)
        return

  watcher = threading.Thread(target=watch, name='vit_jax storage watch', daemon=True)
  watcher.start()
  try:
    yield seen_down
  finally:
    done.set()
    watcher.join()


def _is_connection_failure(error: BaseException) -> bool:
  """Whether a storage library's error (or one it wraps) is a connection that failed or timed out."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, (ConnectionError, TimeoutError)) or any(
        word in type(error).__name__ for word in ('Connect', 'Timeout')):
      return True
    error = error.__cause__ or error.__context__
  return False


def _outage(path, error: BaseException) -> Tuple[bool, bool]:
  """(whether `error` is an outage, whether the storage answers now), from one probe."""
  answering = problem(path) is None
  return paths.is_url(path) and (not answering or _is_connection_failure(error)), answering


def is_outage(path, error: BaseException) -> bool:
  """Whether `error`, raised by a call that reached the storage of `path`, is that storage failing (it does
  not answer now, or the call's connection failed), not a fault of the call itself."""
  return _outage(path, error)[0]


def retrying(path, what: str, fn: Callable[[], object], *, patience_s: float,
             safe: Callable[[], str] = lambda: ''):
  """fn(), a call that reaches the storage of `path`, watched (`reporting_stalls`); when it fails while that
  storage does not answer (or with a connection error), waits for it (`wait_until_answering`, its patience
  counted from the first failure) and calls fn again. Other failures are raised as they are."""
  first_failure = None
  while True:
    try:
      with reporting_stalls(path, what) as seen_down:
        return fn()
    except Exception as e:  # pylint: disable=broad-except  (sorted below: only storage outages are retried)
      if isinstance(e, StorageUnreachable):
        raise
      outage, answering = _outage(path, e)
      if not outage:
        raise
      first_failure = first_failure or min([time.time(), *seen_down])
      if answering and time.time() - first_failure >= patience_s:
        raise
      logging.warning('%s failed while storage of %s did not answer (%s); trying again once it answers.',
                      what[0].upper() + what[1:], path, errors.one_line(e, 300))
      wait_until_answering(path, what=what, patience_s=patience_s, safe=safe, since=first_failure)
      if answering:
        time.sleep(FIRST_RETRY_S)  # It answered all along: a flaky connection, not an outage. Not in a tight loop.
