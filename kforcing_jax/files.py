"""Result and cache files written whole: a reader, or another process on a
shared workdir, never sees a partial one."""

import os
import tempfile


def atomic_write(path: str, write_fn) -> None:
  """Writes via a temp file in the same folder, then renames onto `path`.

  `write_fn(f)` writes to a binary file. Concurrent writers (several
  processes on one workdir) never expose a partial file; the last rename
  wins.
  """
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-', suffix='.part')
  try:
    with os.fdopen(fd, 'wb') as f:
      write_fn(f)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from others.
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write_text(path: str, text: str) -> None:
  atomic_write(path, lambda f: f.write(text.encode('utf-8')))


def check_writable(folder: str, purpose: str) -> None:
  """Refuses a folder this process cannot write a file into (read-only
  mount, permissions), before the work whose results go there: `purpose`
  says what would be written. Creates the folder if missing. Tries a real
  file, as os.access misses read-only mounts for root."""
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise ValueError(f'{folder} is a file, not a folder: {purpose}')
  try:
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-', suffix='.probe')
    os.close(fd)
    os.remove(tmp)
  except OSError as e:
    raise ValueError(f'{folder} is not writable ({e.strerror or e}): '
                     f'{purpose}') from e
