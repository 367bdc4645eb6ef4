"""The group database of a wsgirun isolate: one group, the isolate user's own.

Pyodide has no grp module. The group has the isolate's gid and is named after
the user that `pwd` returns.
"""

import collections as _collections
import os as _os

_FIELDS = ("gr_name", "gr_passwd", "gr_gid", "gr_mem")


class struct_group(_collections.namedtuple("struct_group", _FIELDS)):
    """grp.struct_group: a group database entry."""

    __slots__ = ()
    n_fields = n_sequence_fields = len(_FIELDS)
    n_unnamed_fields = 0


def _entry():
    import pwd

    user = pwd.getpwuid(_os.getuid())
    return struct_group(user.pw_name, "x", _os.getgid(), [])


def getgrgid(id):
    entry = _entry()
    if id != entry.gr_gid:
        raise KeyError("getgrgid(): gid not found: %r" % (id,))
    return entry


def getgrnam(name):
    if not isinstance(name, str):
        raise TypeError("getgrnam() argument must be str, not %s" % type(name).__name__)
    entry = _entry()
    if name != entry.gr_name:
        raise KeyError("getgrnam(): name not found: %r" % (name,))
    return entry


def getgrall():
    return [_entry()]
