"""One path layer: every file vit_jax reads or writes is named by a local path or a URL (`gs://bucket/run`,
`s3://...`) and reached through `etils.epath`, the layer orbax and tfds use for the same paths.

Writes are whole-or-nothing either way: a local file is written beside its destination, flushed to disk and
renamed over it; an object store has no rename, but an object appears only once its upload completes, so the
bytes are assembled in memory and uploaded in one call.
"""
import contextlib
import io
import os
from typing import Iterator, Union

from etils import epath


def is_url(path: Union[str, os.PathLike]) -> bool:
  return '://' in os.fspath(path)


def absolute(path: Union[str, os.PathLike]) -> str:
  """A URL as given; a local path made absolute (`~` expanded), so that it names the same place from any
  directory."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


def join(base: Union[str, os.PathLike], *names: str) -> str:
  return os.fspath(epath.Path(base).joinpath(*names))


def exists(path) -> bool:
  return epath.Path(path).exists()


def isdir(path) -> bool:
  return epath.Path(path).is_dir()


def listdir(path) -> list:
  return sorted(p.name for p in epath.Path(path).iterdir())


def makedirs(path) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def open_file(path, mode: str = 'r'):
  """A file object for `path`: seekable for reading (np.load needs it) on every backend."""
  return epath.Path(path).open(mode)


def read_text(path) -> str:
  return epath.Path(path).read_text()


def move(source, destination) -> None:
  """Moves a file or a folder (on an object store: every object under it is copied, then deleted)."""
  epath.Path(source).rename(destination)


@contextlib.contextmanager
def atomic_writer(path, mode: str = 'wb') -> Iterator[io.IOBase]:
  """A file to write `path` through: nothing appears at `path` unless the block completes, and then all of
  it does (see the module docstring). The parent folder is created."""
  path = os.fspath(path)
  if is_url(path):
    buffer = io.BytesIO() if 'b' in mode else io.StringIO()
    yield buffer
    makedirs(os.path.dirname(path))
    with epath.Path(path).open(mode) as f:
      f.write(buffer.getvalue())
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # A name of our own, opened like any file (mkstemp's would be private, 0600): permissions follow the umask.
  tmp_path = f'{os.path.abspath(path)}.{os.getpid()}.tmp'
  try:
    with open(tmp_path, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise


def write_text(path, text: str) -> None:
  with atomic_writer(path, 'w') as f:
    f.write(text)


def upload_tree(local_dir: str, destination) -> None:
  """Copies every file under the local folder `local_dir` to the same relative path under `destination` (for
  writers that reach only local files: TensorFlow's summaries, JAX's profiler)."""
  for root, _, files in os.walk(local_dir):
    for name in files:
      source = os.path.join(root, name)
      with open(source, 'rb') as f, atomic_writer(join(destination, os.path.relpath(source, local_dir))) as out:
        out.write(f.read())
