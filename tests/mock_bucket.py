"""gs://bucket/... mapped onto a local folder for every etils.epath call (`mock_bucket`).

What a run on a pod slice reads from or leaves in its bucket is then a local folder the test can
inspect. Readers that bypass epath (tensorstore, array_record's own GCS reader) do not see it.
"""

import contextlib
import os

from etils.epath import gpath
from etils.epath import testing as epath_testing


@contextlib.contextmanager
def mock_bucket(root, monkeypatch):
  """Within the block, epath reads and writes gs://X under `root`/X."""
  root = str(root)

  def local(p):
    s = os.fspath(p)
    return os.path.join(root, s[len("gs://"):]) if s.startswith("gs://") else s

  def remote(p):
    s = os.fspath(p)
    return "gs://" + os.path.relpath(s, root) if s.startswith(root) else s

  def mapped(original, path, *args, **kwargs):
    return original(local(path), *(local(a) for a in args), **kwargs)

  def open_(original, path, mode):  # a bucket has no directories to create first
    if "w" in mode or "a" in mode:
      os.makedirs(os.path.dirname(local(path)), exist_ok=True)
    return original(local(path), mode)

  def glob(original, path):
    return [remote(p) for p in original(local(path))]

  def walk(original, top, **kwargs):
    for dirpath, dirs, files in original(local(top), **kwargs):
      yield remote(dirpath), dirs, files

  names = ("copy", "exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "rename", "replace",
           "rmtree", "stat")
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # tf's gfile would bypass the mock
  with epath_testing.mock_epath(open=open_, glob=glob, walk=walk, **{n: mapped for n in names}):
    yield
