"""JAX's persistent compilation cache, for runs that restart: a rerun loads the executables compiled before.

Where (`config.compilation_cache_dir`): 'auto' puts it beside the workdir (`<parent>/jax_compilation_cache`),
so a restart, and a new workdir of the same config, find it; '' turns it off; anything else is the folder
(local or `gs://`). Keys are JAX's: a hash of the program, the compile options, the devices and the jax
version, so a changed config compiles a changed program and never loads another's executable. Every
executable is kept, however quickly it compiled (JAX's default keeps those over a second; its
JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS wins), so that a restart compiles nothing. One exception: this
jaxlib cannot serialize CPU executables holding oneDNN fusions (`config.cpu_matmul='onednn'`), which compile on
every run.

Entries are written whole or not at all (`paths.atomic_writer`): two processes writing one entry leave one
whole file, a process killed mid-write leaves none. JAX's own file cache writes in place, and a truncated entry
would then fail to load on every later run. As JAX does, only process 0 writes; every process reads.
"""
import collections
import os
import threading
from typing import Optional
import warnings

from absl import logging
from etils import epath
import jax

from vit_jax import host_cpu
from vit_jax import paths

AUTO = 'auto'
FOLDER = 'jax_compilation_cache'

_REQUESTS, _HITS = '/jax/compilation_cache/compile_requests_use_cache', '/jax/compilation_cache/cache_hits'
_SAVED, _COMPILED = '/jax/compilation_cache/compile_time_saved_sec', '/jax/core/compile/backend_compile_duration'
_counts = collections.Counter()
_seconds = collections.Counter()
_listening = threading.Lock()
_directory: Optional[str] = None


def directory_for(setting: str, workdir: str) -> Optional[str]:
  """The cache folder a `config.compilation_cache_dir` setting names for a run in `workdir` (None: off)."""
  if not setting:
    return None
  if setting != AUTO:
    return paths.absolute(setting)
  return paths.join(os.path.dirname(paths.absolute(workdir).rstrip('/')), FOLDER)


class _WholeFileCache:
  """JAX's cache interface (`get`, `put`) over one folder, each entry written whole or not at all."""

  def __init__(self, directory: str):
    self._path = epath.Path(directory)

  def get(self, key: str) -> Optional[bytes]:
    try:
      return (self._path / key).read_bytes()
    except FileNotFoundError:
      return None

  def put(self, key: str, value: bytes) -> None:
    path = self._path / key
    if path.exists():
      return
    with paths.atomic_writer(os.fspath(path)) as f:
      f.write(value)


def _on_event(event: str, **kwargs) -> None:
  del kwargs
  if event in (_REQUESTS, _HITS):
    _counts[event] += 1


def _on_duration(event: str, seconds: float, **kwargs) -> None:
  del kwargs
  if event in (_SAVED, _COMPILED):
    _seconds[event] += seconds


def enable(directory: str) -> None:
  """Compiled executables are loaded from and saved to `directory` from now on in this process."""
  global _directory
  from jax._src import compilation_cache as jax_cache  # pylint: disable=g-import-not-at-top
  from jax._src import monitoring  # pylint: disable=g-import-not-at-top
  with _listening:
    if _directory is None:
      monitoring.register_event_listener(_on_event)
      monitoring.register_event_duration_secs_listener(_on_duration)
      # A known limit of this jaxlib (the module docstring), not a fault: said once below, not per compile.
      warnings.filterwarnings('ignore', message=r'(?s).*ToProto is not implemented for thunk kind: onednn')
    _directory = directory
  jax.config.update('jax_compilation_cache_dir', directory)
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax_cache.reset_cache()
  try:
    # Our entry writer in place of JAX's file cache (the module docstring says why); private to JAX.
    with jax_cache._cache_initialized_mutex:  # pylint: disable=protected-access
      jax_cache._cache = _WholeFileCache(directory)  # pylint: disable=protected-access
      jax_cache._cache_initialized = True  # pylint: disable=protected-access
  except AttributeError:
    logging.warning('This jax keeps its compilation cache elsewhere: its own file cache is used.')
  logging.info('Compilation cache: %s%s.', directory,
               ' (steps compiled with oneDNN dots, config.cpu_matmul=onednn, are not kept: this jaxlib cannot '
               'serialize them)' if host_cpu.runs_on_cpu() else '')


def use() -> dict:
  """What the cache did in this process so far: executables loaded and compiled, seconds saved and spent."""
  return dict(loaded=_counts[_HITS], compiled=_counts[_REQUESTS] - _counts[_HITS], saved_s=_seconds[_SAVED],
              compile_s=_seconds[_COMPILED])


def log_use(when: str) -> None:
  if _directory is None:
    return
  counts = use()
  logging.info('Compilation cache (%s): %d executables loaded, %.1f s of compiling saved; %d compiled '
               '(%.1f s compiling in all).', when, counts['loaded'], counts['saved_s'], counts['compiled'],
               counts['compile_s'])
