"""Writers of weight files in torch.save's two layouts, and a pickle payload that would run a
shell command if unpickled. Plain pickle and zipfile: torch is not needed to write them."""

import os
import pickle
import struct
import zipfile

from tljax.weights import torch_file


class RunsShell:
  """Unpickles into a call of os.system(command)."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


def zip_file(path, tree_bytes, storages):
  """torch's zip layout: the pickled tree, the byte order, then one member per storage."""
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', tree_bytes)
    archive.writestr('archive/byteorder', 'little')
    for key, data in storages.items():
      archive.writestr(f'archive/data/{key}', data)


def legacy_file(path, tree_bytes, storages, numels=None):
  """torch's legacy layout: magic, protocol, sys info, tree, storage keys, then each storage as
  an 8-byte element count and its bytes (`numels` may claim other counts)."""
  with open(path, 'wb') as f:
    for header in (torch_file.LEGACY_MAGIC, 1001, {'little_endian': True}):
      pickle.dump(header, f, protocol=2)
    f.write(tree_bytes)
    pickle.dump(list(storages), f, protocol=2)
    for key, data in storages.items():
      numel = (numels or {}).get(key, len(data) // 4)
      f.write(struct.pack('<Q', numel) + data)


def write_malicious(path, marker, zip_format):
  """A torch.save-like file whose state dict, unpickled, would `touch marker`."""
  payload = pickle.dumps({'conv.weight': RunsShell(f'touch {marker}')}, protocol=2)
  (zip_file if zip_format else legacy_file)(path, payload, {})
