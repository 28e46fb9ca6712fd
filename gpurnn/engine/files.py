"""Writing a file so that a crash at any moment leaves either the old file or the new one."""
import os
import tempfile


def write_atomically(path, write):
    """Call ``write(f)`` with ``f`` a binary file in ``path``'s directory, then make it ``path``.

    The bytes go to a hidden temporary file ``.NAME.*.tmp`` beside ``path``, are flushed and
    fsynced, and the file is renamed over ``path`` (``os.replace``), then the directory is
    fsynced so the rename itself is durable.  An exception, or a process killed at any point,
    leaves the previous file at ``path`` as it was; on an exception the temporary file is
    removed."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory):
    # Makes the rename itself durable; some systems cannot open a directory for that.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
