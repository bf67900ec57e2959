"""Runs gcp-storage-emulator (one bucket) with one gap to real GCS closed: its downloads carry no
`x-goog-generation` header, which GCS always sends and TensorStore (orbax's array storage) requires to read
("Malformed StorageGeneration").

  python tests/gcs_emulator.py HOST PORT BUCKET [DATA_DIR]

The bucket lives in memory, or under DATA_DIR when given: then the emulator can be stopped and started again
on the same port and the bucket is still there (a storage outage).
"""
from http import HTTPStatus
import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
    record = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    response['x-goog-generation'] = str(record['generation'])
    response['x-goog-metageneration'] = str(record.get('metageneration', 1))


objects.download = _download_with_generation
# The routes take the handler functions when the server module loads: imported after the replacement.
from gcp_storage_emulator.server import create_server  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':
  host, port, bucket, *data_dir = sys.argv[1:]
  sys.exit(create_server(host, int(port), in_memory=not data_dir, default_bucket=bucket,
                         data_dir=data_dir[0] if data_dir else None).run())
