"""File locks and descriptor flags for wsgirun isolates.

`flock` and `lockf` take real locks on the host file (flock(2)), so they
exclude other isolates, daemon processes and host programs that lock the
same file. A file that exists only in the isolate's memory is private to the
isolate, and locking it always succeeds. A file's lock is released when
`LOCK_UN` is asked for or when the file is closed.

On Pyodide builds that have a fcntl module of their own, `_wsgirun_compat`
sets `_native` to it before this file runs.
"""

import errno as _errno
import struct as _struct

from _wsgirun_compat import HostModule as _HostModule

_wsgirun = True
_native = globals().get("_native")
_posix = _HostModule("_wsgirun_posix")

LOCK_SH = 1
LOCK_EX = 2
LOCK_NB = 4
LOCK_UN = 8

F_DUPFD = 0
F_GETFD = 1
F_SETFD = 2
F_GETFL = 3
F_SETFL = 4
F_GETLK = 5
F_SETLK = 6
F_SETLKW = 7
F_DUPFD_CLOEXEC = 1030
FD_CLOEXEC = 1
F_RDLCK = 0
F_WRLCK = 1
F_UNLCK = 2

# The native module's numbers, where there is one, so that its commands keep working.
if _native is not None:
    globals().update({name: value for name, value in vars(_native).items() if name.isupper()})

# Results of the host's lock calls.
_LOCKED = 0
_WOULD_BLOCK = 1
_BAD_DESCRIPTOR = 2

# FD_CLOEXEC per descriptor. Python opens every file with O_CLOEXEC, and no
# isolate can run a program, so the flag only needs to read back as set.
_descriptor_flags = {}


def _fileno(fd):
    if isinstance(fd, int):
        if fd < 0:
            raise ValueError("file descriptor cannot be a negative integer (%d)" % fd)
        return fd
    if hasattr(fd, "fileno"):
        return _fileno(fd.fileno())
    raise TypeError("argument must be an int, or have a fileno() method.")


def _raise_for(code):
    if code == _WOULD_BLOCK:
        raise BlockingIOError(_errno.EAGAIN, "Resource temporarily unavailable")
    if code == _BAD_DESCRIPTOR:
        raise OSError(_errno.EBADF, "Bad file descriptor")


def flock(fd, operation):
    """Lock or unlock the whole file open as `fd`, as flock(2) does."""
    fd = _fileno(fd)
    kind = operation & ~LOCK_NB
    if kind == LOCK_UN:
        _raise_for(_posix.unlock(fd))
    elif kind in (LOCK_SH, LOCK_EX):
        _raise_for(_posix.lock(fd, kind == LOCK_EX, not operation & LOCK_NB))
    else:
        raise OSError(_errno.EINVAL, "Invalid argument")


def lockf(fd, cmd, len=0, start=0, whence=0):
    """Lock or unlock the file open as `fd`.

    NOTE: this takes the same whole-file lock as `flock`, not a POSIX record
    lock on the byte range, so it does not exclude programs that lock the
    file with fcntl(F_SETLK).
    """
    flock(fd, cmd)


def _record_lock(fd, cmd, arg):
    """F_SETLK and F_SETLKW with a packed struct flock: a whole-file lock of its l_type."""
    (kind,) = _struct.unpack_from("h", arg)
    if kind == F_UNLCK:
        flock(fd, LOCK_UN)
    elif kind in (F_RDLCK, F_WRLCK):
        blocking = 0 if cmd == F_SETLKW else LOCK_NB
        flock(fd, (LOCK_EX if kind == F_WRLCK else LOCK_SH) | blocking)
    else:
        raise OSError(_errno.EINVAL, "Invalid argument")
    return arg


def fcntl(fd, cmd, arg=0):
    """Descriptor flags and locks; other commands go to Pyodide's fcntl where it has one."""
    fd = _fileno(fd)
    if cmd == F_GETFD:
        return _descriptor_flags.get(fd, FD_CLOEXEC)
    if cmd == F_SETFD:
        _descriptor_flags[fd] = int(arg) & FD_CLOEXEC
        return 0
    if cmd == F_GETFL:
        flags = _posix.get_flags(fd)
        if flags < 0:
            raise OSError(_errno.EBADF, "Bad file descriptor")
        return flags
    if cmd == F_SETFL:
        if _posix.set_flags(fd, int(arg)) < 0:
            raise OSError(_errno.EBADF, "Bad file descriptor")
        return 0
    if cmd in (F_SETLK, F_SETLKW) and isinstance(arg, (bytes, bytearray)):
        return _record_lock(fd, cmd, arg)
    if _native is not None:
        return _native.fcntl(fd, cmd, arg)
    raise OSError(_errno.EINVAL, "fcntl command %r is not supported in wsgirun isolates" % (cmd,))


def ioctl(fd, request, arg=0, mutate_flag=True):
    if _native is not None:
        return _native.ioctl(_fileno(fd), request, arg, mutate_flag)
    raise OSError(_errno.ENOTTY, "Inappropriate ioctl for device")
