"""The password database of a wsgirun isolate: one entry, the isolate's own user.

Pyodide has no pwd module. The entry has the isolate's uid and gid (as
`os.getuid()` returns them), the name from $USER and the home folder from
$HOME, so `getpass.getuser()`, `os.path.expanduser()` and `Path.owner()`
agree with each other. Other users do not exist.
"""

import collections as _collections
import os as _os

_FIELDS = ("pw_name", "pw_passwd", "pw_uid", "pw_gid", "pw_gecos", "pw_dir", "pw_shell")


class struct_passwd(_collections.namedtuple("struct_passwd", _FIELDS)):
    """pwd.struct_passwd: a password database entry."""

    __slots__ = ()
    n_fields = n_sequence_fields = len(_FIELDS)
    n_unnamed_fields = 0


def _entry():
    name = _os.environ.get("USER") or _os.environ.get("LOGNAME") or "wsgirun"
    home = _os.environ.get("HOME") or "/"
    return struct_passwd(name, "x", _os.getuid(), _os.getgid(), "wsgirun isolate", home, "/bin/sh")


def getpwuid(uid):
    entry = _entry()
    if uid != entry.pw_uid:
        raise KeyError("getpwuid(): uid not found: %r" % (uid,))
    return entry


def getpwnam(name):
    if not isinstance(name, str):
        raise TypeError("getpwnam() argument must be str, not %s" % type(name).__name__)
    entry = _entry()
    if name != entry.pw_name:
        raise KeyError("getpwnam(): name not found: %r" % (name,))
    return entry


def getpwall():
    return [_entry()]
