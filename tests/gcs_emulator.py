"""Runs gcp-storage-emulator (one bucket) with two gaps to real GCS closed: its downloads carry no
`x-goog-generation` header, which GCS always sends and TensorStore (orbax's array storage) requires to read
("Malformed StorageGeneration"); and it rewrites its files on disk in place, so that a stop mid-write (the
outage test stops it while a run writes) could leave its index half written and its next start failing to
read it. Here each file is written whole or not at all, as a GCS object is.

  python tests/gcs_emulator.py HOST PORT BUCKET [DATA_DIR]

The bucket lives in memory, or under DATA_DIR when given: then the emulator can be stopped and started again
on the same port and the bucket is still there (a storage outage).
"""
from http import HTTPStatus
import os
import sys

from gcp_storage_emulator import storage as emulator_storage
from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
    record = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    response['x-goog-generation'] = str(record['generation'])
    response['x-goog-metageneration'] = str(record.get('metageneration', 1))


objects.download = _download_with_generation

_write_bytes = emulator_storage._FileStore.write_bytes  # pylint: disable=protected-access


def _write_bytes_whole(store, rel, content):
  if store._use_memory:  # pylint: disable=protected-access
    _write_bytes(store, rel, content)
    return
  path = store._disk_path(rel)  # pylint: disable=protected-access
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(f'{path.name}.partial-{os.getpid()}')
  partial.write_bytes(content)
  os.replace(partial, path)


emulator_storage._FileStore.write_bytes = _write_bytes_whole  # pylint: disable=protected-access
# The routes take the handler functions when the server module loads: imported after the replacement.
from gcp_storage_emulator.server import create_server  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':
  host, port, bucket, *data_dir = sys.argv[1:]
  sys.exit(create_server(host, int(port), in_memory=not data_dir, default_bucket=bucket,
                         data_dir=data_dir[0] if data_dir else None).run())
