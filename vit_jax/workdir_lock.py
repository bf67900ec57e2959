"""One run per workdir: process 0 of a run holds an advisory lock on `<workdir>/lock` for as long as it trains.

The lock is the kernel's (`flock`), so it dies with its holder: a run killed with `kill -9` leaves the file
but no lock, and the next run takes it over. The file names the holder (host, pid, command, start time) so
that a refused run can say who has the workdir.
"""
import errno
import fcntl
import json
import os
import socket
import sys
import time

from absl import logging

from vit_jax import errors

LOCK_FILE = 'lock'


def _read_holder(fd: int) -> dict:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    return json.loads(os.read(fd, 65536).decode() or '{}')
  except (OSError, ValueError):
    return {}


def describe(holder: dict) -> str:
  if not holder:
    return 'a run that has not yet written its name'
  started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))
  return (f'pid {holder.get("pid")} on host {holder.get("host")}, started {started}: '
          f'{holder.get("command", "?")}')


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir's lock, or raises `WorkdirError` naming its holder."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self.fd = None

  def acquire(self) -> None:
    if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
      raise errors.WorkdirError(f'--workdir={self.workdir} is a file, not a folder: give a new folder (or a run\'s '
                                'workdir to resume it).')
    while True:
      try:
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as e:
        raise errors.WorkdirError(f'Cannot write into --workdir={self.workdir}: {e.strerror}. Give a folder this '
                                  'user can write (a run writes its checkpoints and summaries there).') from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        holder = _read_holder(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise errors.WorkdirError(
              f'{self.workdir} is in use by another run ({describe(holder)}). Two runs on one workdir would '
              'overwrite each other\'s checkpoints: wait for it to end, or give this run a new --workdir.'
          ) from None
        # Some cluster filesystems (Lustre without -o flock) have no locks: run, but say so.
        logging.warning('Cannot lock %s (%s): nothing stops a second run from using this workdir.', self.path, e)
        return
      # The holder before us may have deleted the file between our open and our lock: then we locked a file
      # that no longer has this name, and must lock the new one.
      try:
        same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same_file = False
      if same_file:
        break
      os.close(fd)
    previous = _read_holder(fd)
    if previous:
      logging.warning('Took over %s from a run that ended without releasing it (%s).', self.path,
                      describe(previous))
    holder = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time(),
              'command': ' '.join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    os.fsync(fd)
    self.fd = fd

  def release(self) -> None:
    if self.fd is None:
      return
    # Delete while still holding the lock: the next run finds no file, not our stale name.
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass
    os.close(self.fd)  # Releases the lock.
    self.fd = None

  def __enter__(self) -> 'WorkdirLock':
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()
