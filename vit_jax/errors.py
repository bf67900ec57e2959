"""Errors a user can fix (config, data, checkpoint, workdir, devices), and how the command-line tools report
them: one short message and exit status 2, with the traceback only on request. A preempted run exits with
status 75 (rerun to resume). Anything else is a bug and keeps its full traceback.

No heavy imports here: `config_lib` and the models use it before JAX or TensorFlow start.
"""
import errno
import logging as py_logging
import os
import signal
import sys

from absl import app
from absl import flags
from absl import logging

TRACEBACK_ENV = 'VIT_JAX_TRACEBACK'


class UserError(Exception):
  """A problem in what the user gave; the message names it and the fix."""


class ConfigError(UserError, ValueError):
  """A setting that cannot work: a config field, or one that does not fit the devices, data or model."""


class DataError(UserError, FileNotFoundError):
  """A dataset that is not where or what the config says."""


class CheckpointError(UserError, ValueError):
  """A checkpoint that cannot be used: unreadable, corrupt, or not matching the model."""


class WorkdirError(UserError, RuntimeError):
  """A workdir that a run cannot use as it is: in use by another job, or missing its record."""


class TrainingDiverged(UserError, FloatingPointError):
  """The loss or the parameters stopped being finite."""


PREEMPTED_EXIT_STATUS = 75  # sysexits.h EX_TEMPFAIL: try again. Launchers rerun the job on it.
INTERRUPTED_EXIT_STATUS = 130  # 128 + SIGINT, as shells report a Ctrl-C: the user stopped it, no relaunch.


class Preempted(Exception):
  """The run was told to stop (SIGTERM, or Ctrl-C), saved a checkpoint of its step and stopped; a rerun
  resumes. `exit_status`: 75 for a preemption (launchers rerun), 130 for a Ctrl-C."""

  def __init__(self, message: str, exit_status: int = PREEMPTED_EXIT_STATUS):
    super().__init__(message)
    self.exit_status = exit_status


def one_line(error: BaseException, limit: int = 400) -> str:
  """An exception in one line, cut: storage errors quote kilobytes of their spec. The library's own error,
  when there is one underneath (the storage library's names the array and file), is the one shown."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = ' '.join(f'{type(error).__name__}: {error}'.split())
  return text if len(text) <= limit else text[:limit] + ' ...'


def show_tracebacks() -> bool:
  """Whether the user asked for tracebacks (--verbose, or the environment variable)."""
  verbose = 'verbose' in flags.FLAGS and flags.FLAGS.is_parsed() and flags.FLAGS.verbose
  return verbose or os.environ.get(TRACEBACK_ENV, '') not in ('', '0')


def quiet_library_logs() -> None:
  """Orbax, tfds and fsspec (object stores) narrate every file they touch at INFO: their warnings and errors
  are kept, the chatter dropped. A failed checkpoint write makes orbax log the same storage error, traceback
  and all, from each of its threads; the run then reports it once, so theirs keep their first line only (all
  of it with --verbose). gcsfs repeats its warnings on every request (a bucket type it cannot determine
  without credentials): each is shown once."""
  shown_gcsfs = set()

  def keep(record) -> bool:
    if not any(part in record.pathname for part in ('/orbax/', '/tensorflow_datasets/', '/fsspec/', '/gcsfs/')):
      return True
    if record.levelno < py_logging.WARNING:
      return False
    first_line = record.getMessage().split('\n')[0][:300]
    if '/gcsfs/' in record.pathname:
      if first_line in shown_gcsfs:
        return False
      shown_gcsfs.add(first_line)
    if not show_tracebacks():
      record.msg, record.args = first_line, ()
      record.exc_info, record.exc_text = None, None
    return True

  logging.get_absl_handler().addFilter(keep)


_PATH_REFUSALS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR)


def _exit_with_one_line(error) -> None:
  if show_tracebacks():
    raise  # pylint: disable=misplaced-bare-raise  (called inside an except block)
  sys.stderr.write(f'Error: {error}\n(--verbose or {TRACEBACK_ENV}=1 shows the traceback)\n')
  sys.stderr.flush()
  sys.exit(2)


def _stopped_at_once() -> None:
  """Exits 130 without the interpreter's shutdown: that would wait for, or tear down mid-work, the threads and
  event loops of a save in flight (orbax's), and print their errors and tracebacks after this message."""
  sys.stderr.write('Stopped at once by Ctrl-C. Checkpoints are renamed into place only when complete, so the newest '
                   'committed one (if any) is intact: rerun the same command to resume from it.\n')
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(INTERRUPTED_EXIT_STATUS)  # pylint: disable=protected-access


def run(main) -> None:
  """`absl.app.run(main)`, with user errors printed as one message and exit status 2."""
  # Defined here, not at import: libraries and notebooks import this module too.
  flags.DEFINE_bool('verbose', False, f'Show the traceback of user errors too (or set {TRACEBACK_ENV}=1).')

  def main_reporting_user_errors(argv):
    try:
      return main(argv)
    except Preempted as e:
      # Saved and stopped. The interpreter's exit (JAX's and orbax's exit handlers) still takes a moment: a
      # Ctrl-C then stops at once, as during the run, not with a traceback from an exit handler.
      signal.signal(signal.SIGINT, lambda signum, frame: _stopped_at_once())
      sys.stderr.write(f'{e}\n')
      sys.stderr.flush()
      sys.exit(e.exit_status)
    except KeyboardInterrupt:  # The second Ctrl-C; the run's `finally`s (its workdir lock, its files) have run.
      if show_tracebacks():
        raise
      _stopped_at_once()
    except UserError as e:
      _exit_with_one_line(e)
    except OSError as e:
      # The machine refusing a path the user gave (an output, a folder): theirs to fix, not a bug.
      if e.errno not in _PATH_REFUSALS or not e.filename:
        raise
      _exit_with_one_line(f'Cannot use {e.filename}: {e.strerror}. Give a path this user can write (the flags '
                          'name them: --workdir, --out, --config.data_dir).')

  app.run(main_reporting_user_errors)
