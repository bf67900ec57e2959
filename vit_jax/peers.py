"""Which process of a multi-process run was lost, and stopping the others promptly when one is.

Each process records its host and pid in JAX's coordination service when it joins, and watches the peers on
its own host (a pid that is gone: noticed within a second). A peer on another host is noticed by the
coordination service when its heartbeats stop (`--heartbeat_timeout_seconds`); JAX then ends every process
itself, naming the task ("The following tasks are unhealthy (stopped sending heartbeats): 1"). When process
0 (the coordinator) dies, JAX ends the others at once ("the JAX distributed service detected fatal errors").

A survivor that notices first says which process is gone and exits with status 3, rather than waiting in a
collective or at JAX's shutdown barrier, which held it for the heartbeat timeout and then aborted.

The watch thread is stopped and joined before the process exits (on leaving, and at exit otherwise): a daemon
thread still inside a jaxlib call when the interpreter finalizes is unwound through C++ frames that swallow the
unwinding, and the process aborts ("terminate called ... FATAL: exception not rethrown") after its work is done.
"""
import atexit
import json
import os
import socket
import sys
import threading
import time
from typing import List, Optional

import jax
from jax._src import distributed  # The coordination client: no public accessor in this JAX.

LOST_EXIT_STATUS = 3
_KEY = 'vit_jax/process/{}'
_LEAVING_KEY = 'vit_jax/leaving/{}'  # Set by a process that ends on purpose (done, preempted, a user error).
_stop_watching = threading.Event()
_watcher: Optional[threading.Thread] = None


def _client():
  return distributed.global_state.client


def register() -> None:
  """Records this process's host and pid (after `jax.distributed.initialize`)."""
  if _client() is None:
    return
  _client().key_value_set(_KEY.format(jax.process_index()),
                          json.dumps({'host': socket.gethostname(), 'pid': os.getpid()}), allow_overwrite=True)


def watch(interval_seconds: float = 1.0) -> None:
  """Starts a thread that stops this process as soon as a peer on its host is gone."""
  if _client() is None:
    return

  global _watcher

  def poll():
    while not _stop_watching.wait(interval_seconds):
      lost = _lost_on_this_host()
      if lost and not _stop_watching.is_set():
        _stop(lost, 'noticed by the watch on this host')

  _stop_watching.clear()
  _watcher = threading.Thread(target=poll, name='vit_jax_peers', daemon=True)
  _watcher.start()
  atexit.register(_stop_watch)  # Runs before the interpreter finalizes its threads (see the module docstring).


def _stop_watch() -> None:
  _stop_watching.set()
  if _watcher is not None and _watcher is not threading.current_thread():
    _watcher.join(timeout=60)  # At most the request in flight.


def leaving() -> None:
  """This process ends on purpose: its peers must not take its exit for a loss; it stops watching them."""
  _stop_watch()
  if _client() is not None:
    try:
      _client().key_value_set(_LEAVING_KEY.format(jax.process_index()), '1', allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except  (the service may be gone already)
      pass


def _has_left(index: int) -> bool:
  try:
    return _client().key_value_try_get(_LEAVING_KEY.format(index)) == '1'
  except Exception:  # pylint: disable=broad-except  (not set)
    return False


_registry = {}  # index -> {'host', 'pid'} of the peers read so far (read until all are there, then kept).


def _peers() -> dict:
  if len(_registry) < jax.process_count() - 1:
    try:
      for key, value in _client().key_value_dir_get(_KEY.format('')):  # One request for every process.
        index = int(key.rsplit('/', 1)[-1])
        if index != jax.process_index():
          _registry[index] = json.loads(value)
    except Exception:  # pylint: disable=broad-except  (the service is gone: keep what we know)
      pass
  return dict(_registry)


def _name(index: int, peer: dict) -> str:
  return f'process {index} (pid {peer.get("pid", "?")} on host {peer.get("host", "?")})'


def _lost_on_this_host() -> List[str]:
  here = socket.gethostname()
  return [_name(i, peer) for i, peer in _peers().items()
          if peer.get('host') == here and not _pid_alive(peer['pid']) and not _has_left(i)]


def _stop(lost: List[str], how: str) -> None:
  what = f'{", ".join(lost)} is gone' if len(lost) == 1 else f'{", ".join(lost)} are gone'
  sys.stderr.write(f'Error: process {jax.process_index()} of {jax.process_count()} stops: {what} ({how}). Its '
                   f'log says why. Rerun the same command on every host: the run resumes from its newest '
                   f'checkpoint.\n')
  sys.stderr.flush()
  os._exit(LOST_EXIT_STATUS)  # pylint: disable=protected-access  (skip JAX's shutdown barrier: see above)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def find_lost(wait_seconds: float) -> Optional[List[str]]:
  """Descriptions of the lost processes ('process 1 (pid 123 on host h)'), or None if none was found."""
  lost = _lost_on_this_host()
  deadline = time.time() + wait_seconds
  while not lost and time.time() < deadline:
    try:
      live = _client().get_live_nodes(list(range(jax.process_count())))
    except Exception:  # pylint: disable=broad-except
      break
    lost = [_name(i, peer) for i, peer in _peers().items() if i not in live]
    if not lost:
      time.sleep(1)
  return lost or None


# How a failed exchange with a peer reads (gloo on CPU, NCCL on GPU, the coordination service).
_COMMUNICATION_FAILURES = ('Gloo', 'gloo', 'NCCL', 'Connection reset', 'Connection closed', 'Socket closed',
                           'UNAVAILABLE', 'DEADLINE_EXCEEDED', 'heartbeat')


def exit_on_lost_peer(error: BaseException, wait_seconds: float) -> None:
  """Called with an error that ended a multi-process run: if a peer is gone, names it and exits now;
  otherwise returns (the error is the run's own, and keeps its traceback). Waits for heartbeats only when
  the error reads as a failed exchange with a peer."""
  text = str(error)
  lost = find_lost(wait_seconds if any(sign in text for sign in _COMMUNICATION_FAILURES) else 0)
  if lost:
    first_line = text.strip().splitlines()[0][:300] if text.strip() else type(error).__name__
    _stop(lost, first_line)
