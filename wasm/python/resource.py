"""Resource limits and usage of a wsgirun isolate.

Pyodide has no resource module. The values describe the isolate: memory is
its WebAssembly memory (at most 4 GiB, or the server's memory-max), it has
one thread and no child processes, and Emscripten allows 4096 open files. `setrlimit` accepts lower
limits and returns them from `getrlimit`.

NOTE: limits set with `setrlimit` are not enforced.
"""

import collections as _collections
import time as _time

from _wsgirun_compat import HostModule as _HostModule

error = OSError
_posix = _HostModule("_wsgirun_posix")

RLIMIT_CPU = 0
RLIMIT_FSIZE = 1
RLIMIT_DATA = 2
RLIMIT_STACK = 3
RLIMIT_CORE = 4
RLIMIT_RSS = 5
RLIMIT_NPROC = 6
RLIMIT_NOFILE = 7
RLIMIT_MEMLOCK = 8
RLIMIT_AS = 9
RLIMIT_LOCKS = 10
RLIMIT_SIGPENDING = 11
RLIMIT_MSGQUEUE = 12
RLIMIT_NICE = 13
RLIMIT_RTPRIO = 14
RLIMIT_RTTIME = 15
RLIM_INFINITY = -1

RUSAGE_SELF = 0
RUSAGE_CHILDREN = -1
RUSAGE_BOTH = -2
RUSAGE_THREAD = 1

# Limits that the memory cap of the isolate sets, asked for each time: a
# snapshot may hold this module from before the cap of the isolate was known.
_MEMORY_RESOURCES = (RLIMIT_DATA, RLIMIT_RSS, RLIMIT_AS)
# Emscripten's limit on open file descriptors.
_OPEN_FILES_MAX = 4096

_limits = {
    RLIMIT_NOFILE: (_OPEN_FILES_MAX, _OPEN_FILES_MAX),
    RLIMIT_NPROC: (1, 1),
    RLIMIT_CORE: (0, 0),
}

_RUSAGE_FIELDS = (
    "ru_utime", "ru_stime", "ru_maxrss", "ru_ixrss", "ru_idrss", "ru_isrss", "ru_minflt",
    "ru_majflt", "ru_nswap", "ru_inblock", "ru_oublock", "ru_msgsnd", "ru_msgrcv",
    "ru_nsignals", "ru_nvcsw", "ru_nivcsw",
)


class struct_rusage(_collections.namedtuple("struct_rusage", _RUSAGE_FIELDS)):
    """resource.struct_rusage: the resources used by the isolate."""

    __slots__ = ()
    n_fields = n_sequence_fields = len(_RUSAGE_FIELDS)
    n_unnamed_fields = 0


def _check_resource(resource):
    if not isinstance(resource, int) or not RLIMIT_CPU <= resource <= RLIMIT_RTTIME:
        raise ValueError("invalid resource specified")


def getrlimit(resource):
    _check_resource(resource)
    if resource in _MEMORY_RESOURCES and resource not in _limits:
        cap = _posix.memory_max_bytes()
        return (cap, cap)
    return _limits.get(resource, (RLIM_INFINITY, RLIM_INFINITY))


def setrlimit(resource, limits):
    _check_resource(resource)
    try:
        soft, hard = limits
    except (TypeError, ValueError):
        raise ValueError("expected a tuple of 2 integers") from None
    soft, hard = int(soft), int(hard)
    current_hard = getrlimit(resource)[1]
    if hard != RLIM_INFINITY and soft != RLIM_INFINITY and soft > hard:
        raise ValueError("current limit exceeds maximum limit")
    if current_hard != RLIM_INFINITY and (hard == RLIM_INFINITY or hard > current_hard):
        raise ValueError("not allowed to raise maximum limit")
    _limits[resource] = (soft, hard)


def getrusage(who):
    if who not in (RUSAGE_SELF, RUSAGE_CHILDREN, RUSAGE_BOTH, RUSAGE_THREAD):
        raise ValueError("invalid who parameter")
    if who == RUSAGE_CHILDREN:
        return struct_rusage(0.0, 0.0, *([0] * 14))
    max_rss_kib = _posix.memory_bytes() // 1024
    return struct_rusage(_time.process_time(), 0.0, max_rss_kib, *([0] * 13))


def getpagesize():
    # Pages of WebAssembly memory are 64 KiB.
    return 65536
