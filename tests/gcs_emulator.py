"""Run gcp-storage-emulator (``python tests/gcs_emulator.py start --port ...``, its own CLI)
with the object-generation headers that GCS sends on every download and the emulator leaves
out (``x-goog-generation``, ``x-goog-metageneration``): tensorstore's conditional writes (Orbax's
OCDBT manifest, rewritten on resume) read the generation from them."""

import sys

from gcp_storage_emulator import __main__ as cli
from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # not found: the response already says so
    return
  response["x-goog-generation"] = str(obj.get("generation", "1"))
  response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


objects.download = _download_with_generation
# The routing table holds the handler itself: replace it there too.
from gcp_storage_emulator import server  # noqa: E402

for _regex, _handlers in server.HANDLERS:
  for _method, _handler in list(_handlers.items()):
    if _handler is _download:
      _handlers[_method] = _download_with_generation

if __name__ == "__main__":
  sys.exit(cli.main())
