"""Outbound TCP for Python code in a wsgirun isolate.

Pyodide's own sockets cannot connect from a synchronous call. This module
replaces `socket.socket`, `socket.getaddrinfo` and the name lookups of the
standard `socket` module with versions that the host runs: the isolate's
thread waits while the host's network thread connects, sends and receives.
`socket.create_connection`, `makefile` and the `ssl` module of this folder
work on top of it unchanged.

Only outbound TCP exists: no listening sockets, UDP or Unix sockets. Hosts
and ports must be on the application's `--allow-net` list; any other
connection raises PermissionError. `select`, `selectors` and `poll` do not
see these sockets.
"""

import errno as _errno
import json as _json
import os as _os
import socket as _stdlib

from _wsgirun_compat import HostModule as _HostModule

_net = _HostModule("_wsgirun_net")

# Return codes of the host's send and recv_into besides byte counts.
_TIMED_OUT = -1
_FAILED = -2
_WOULD_BLOCK = -3

_STDLIB_SOCKET = _stdlib.socket
_NONBLOCK = getattr(_stdlib, "SOCK_NONBLOCK", 0)
_CLOEXEC = getattr(_stdlib, "SOCK_CLOEXEC", 0)
# fileno() of these sockets returns numbers far above the file descriptors of
# Pyodide's file system, so that they never name a real file.
_FIRST_FILENO = 1 << 20
_next_fileno = _FIRST_FILENO

_UNSUPPORTED = (
    "wsgirun isolates can only open outbound TCP connections (AF_INET or AF_INET6, "
    "SOCK_STREAM) to hosts on --allow-net"
)


def install():
    """Replace the standard socket module's classes and lookups with this module's."""
    _stdlib.socket = socket
    _stdlib.SocketType = socket
    _stdlib.getaddrinfo = getaddrinfo
    _stdlib.gethostbyname = gethostbyname
    _stdlib.gethostbyname_ex = gethostbyname_ex
    _stdlib.socketpair = socketpair
    _stdlib.fromfd = fromfd


def _raise_failure(result, address=None):
    """Raise the exception that a failed host call stands for."""
    name = result.get("errno", "EIO")
    message = result.get("message", "")
    if name.startswith("EAI_"):
        code = getattr(_stdlib, name, getattr(_stdlib, "EAI_FAIL", -4))
        raise _stdlib.gaierror(code, message)
    if name in ("SSL", "SSL_CERT"):
        import ssl

        if name == "SSL_CERT":
            raise ssl.SSLCertVerificationError(
                1,
                "certificate verify failed: %s; trust the server's CA with "
                "SSLContext.load_verify_locations() or the DENO_CERT setting of the server"
                % message,
            )
        raise ssl.SSLError(1, message)
    code = getattr(_errno, name, _errno.EIO)
    if code == _errno.ETIMEDOUT:
        raise TimeoutError("timed out")
    if address is not None and code != _errno.EACCES:
        message = "%s (%s:%s)" % (_os.strerror(code), address[0], address[1])
    raise OSError(code, message)


def _split_address(address):
    if not isinstance(address, tuple) or len(address) not in (2, 4):
        raise TypeError("address must be a (host, port) tuple, got %r" % (address,))
    host, port = address[0], address[1]
    if isinstance(host, bytes):
        host = host.decode("idna")
    if not isinstance(host, str):
        raise TypeError("host must be str, not %s" % type(host).__name__)
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise OverflowError("port must be 0-65535, got %r" % (port,))
    return host, port


class socket:
    """A TCP client socket whose connection lives in the host.

    The interface is the standard `socket.socket` one for clients: timeouts
    (None blocks, 0 raises BlockingIOError, a number raises TimeoutError),
    `makefile`, context management. Socket options are accepted and
    remembered; the host always turns on TCP_NODELAY.
    """

    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        global _next_fileno
        if fileno is not None:
            raise OSError(_errno.EBADF, "socket(fileno=...) is not supported: " + _UNSUPPORTED)
        family = _stdlib.AF_INET if family == -1 else family
        type = _stdlib.SOCK_STREAM if type == -1 else type
        kind = type & ~(_NONBLOCK | _CLOEXEC)
        if family not in (_stdlib.AF_INET, _stdlib.AF_INET6) or kind != _stdlib.SOCK_STREAM:
            raise OSError(
                _errno.EAFNOSUPPORT,
                "cannot create a socket of family %r and type %r: %s" % (family, type, _UNSUPPORTED),
            )
        self._family = family
        self._kind = kind
        self._proto = 0 if proto == -1 else proto
        self._timeout = 0.0 if type & _NONBLOCK else _stdlib.getdefaulttimeout()
        self._id = None
        self._fileno = _next_fileno
        _next_fileno += 1
        self._closed = False
        self._io_refs = 0
        self._peer = None
        self._local = None
        self._read_shut = False
        self._options = {}

    # -- identity --------------------------------------------------------

    @property
    def family(self):
        return _stdlib.AddressFamily(self._family)

    @property
    def type(self):
        return _stdlib.SocketKind(self._kind)

    @property
    def proto(self):
        return self._proto

    @property
    def timeout(self):
        return self._timeout

    def fileno(self):
        return -1 if self._closed else self._fileno

    def __repr__(self):
        state = "closed" if self._closed else "peer=%r" % (self._peer,)
        return "<wsgirun socket fd=%d, family=%d, %s>" % (self.fileno(), self._family, state)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __getstate__(self):
        raise TypeError("cannot pickle %s object" % self.__class__.__name__)

    # -- timeouts and options ---------------------------------------------

    def settimeout(self, value):
        if value is not None:
            value = float(value)
            if value < 0:
                raise ValueError("Timeout value out of range")
        self._timeout = value

    def gettimeout(self):
        return self._timeout

    def setblocking(self, flag):
        self._timeout = None if flag else 0.0

    def getblocking(self):
        return self._timeout != 0.0

    def setsockopt(self, level, optname, value, optlen=None):
        self._options[(level, optname)] = value

    def getsockopt(self, level, optname, buflen=None):
        if (level, optname) == (_stdlib.SOL_SOCKET, getattr(_stdlib, "SO_ERROR", 4)):
            return 0
        if (level, optname) == (_stdlib.SOL_SOCKET, getattr(_stdlib, "SO_TYPE", 3)):
            return self._kind
        value = self._options.get((level, optname), 0)
        if buflen:
            return value if isinstance(value, bytes) else bytes(buflen)
        return value

    # -- connection ------------------------------------------------------

    def _check_open(self):
        if self._closed:
            raise OSError(_errno.EBADF, "Bad file descriptor")

    def _check_connected(self):
        self._check_open()
        if self._id is None:
            raise OSError(_errno.ENOTCONN, "Transport endpoint is not connected")

    def connect(self, address):
        self._check_open()
        if self._id is not None:
            raise OSError(_errno.EISCONN, "Transport endpoint is already connected")
        host, port = _split_address(address)
        # NOTE: a non-blocking socket (timeout 0) connects as a blocking one
        # would, instead of raising BlockingIOError with EINPROGRESS.
        timeout = self._timeout if self._timeout else None
        result = _json.loads(_net.connect(host, port, timeout))
        if not result["ok"]:
            _raise_failure(result, (host, port))
        self._id = result["id"]
        self._local = tuple(result["local"])
        self._peer = tuple(result["peer"])

    def connect_ex(self, address):
        try:
            self.connect(address)
        except TimeoutError:
            return _errno.ETIMEDOUT
        except OSError as error:
            return error.errno or _errno.EIO
        return 0

    def bind(self, address):
        host, port = _split_address(address)
        if host not in ("", "0.0.0.0", "::") or port != 0:
            raise OSError(
                _errno.EADDRNOTAVAIL,
                "cannot bind to %s:%s: the host picks the local address of every connection"
                % (host, port),
            )

    def listen(self, backlog=0):
        raise OSError(_errno.EOPNOTSUPP, "cannot listen for connections: " + _UNSUPPORTED)

    def accept(self):
        raise OSError(_errno.EOPNOTSUPP, "cannot accept connections: " + _UNSUPPORTED)

    def getpeername(self):
        self._check_connected()
        return self._peer

    def getsockname(self):
        self._check_open()
        if self._local is None:
            return ("::", 0, 0, 0) if self._family == _stdlib.AF_INET6 else ("0.0.0.0", 0)
        return self._local

    # -- data ------------------------------------------------------------

    def _raise_host_error(self):
        _raise_failure(_json.loads(_net.error(self._id)))

    def send(self, data, flags=0):
        self._check_connected()
        if flags:
            raise OSError(_errno.EOPNOTSUPP, "send() flags are not supported, got %r" % flags)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            data = memoryview(data)
        if not len(data):
            return 0
        count = _net.send(self._id, data, self._timeout)
        if count >= 0:
            return count
        if count == _TIMED_OUT:
            raise TimeoutError("timed out")
        if count == _WOULD_BLOCK:
            raise BlockingIOError(_errno.EAGAIN, "Resource temporarily unavailable")
        self._raise_host_error()

    def sendall(self, data, flags=0):
        # The host accepts each send whole, so one call sends everything.
        self.send(data, flags)

    def sendto(self, data, flags_or_address, address=None):
        raise OSError(_errno.EOPNOTSUPP, "sendto() is not supported: " + _UNSUPPORTED)

    def sendfile(self, file, offset=0, count=None):
        if offset:
            file.seek(offset)
        total = 0
        while count is None or total < count:
            block = file.read(65536 if count is None else min(65536, count - total))
            if not block:
                break
            self.sendall(block)
            total += len(block)
        return total

    def recv_into(self, buffer, nbytes=0, flags=0):
        self._check_connected()
        if flags:
            raise OSError(_errno.EOPNOTSUPP, "recv() flags are not supported, got %r" % flags)
        view = memoryview(buffer).cast("B")
        if nbytes < 0:
            raise ValueError("negative buffersize in recv_into")
        nbytes = nbytes or len(view)
        if nbytes == 0 or self._read_shut:
            return 0
        count = _net.recv_into(self._id, view[:nbytes], nbytes, self._timeout)
        if count >= 0:
            return count
        if count == _TIMED_OUT:
            raise TimeoutError("timed out")
        if count == _WOULD_BLOCK:
            raise BlockingIOError(_errno.EAGAIN, "Resource temporarily unavailable")
        self._raise_host_error()

    def recv(self, bufsize, flags=0):
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        buffer = bytearray(bufsize)
        count = self.recv_into(buffer, bufsize, flags)
        return bytes(buffer[:count]) if count < bufsize else bytes(buffer)

    def recvfrom(self, bufsize, flags=0):
        return self.recv(bufsize, flags), self._peer

    def recvfrom_into(self, buffer, nbytes=0, flags=0):
        return self.recv_into(buffer, nbytes, flags), self._peer

    def pending(self):
        """Bytes received from the peer and not read yet."""
        return 0 if self._id is None else _net.pending(self._id)

    # -- shutdown and close ---------------------------------------------

    def shutdown(self, how):
        self._check_connected()
        if how in (_stdlib.SHUT_RD, _stdlib.SHUT_RDWR):
            self._read_shut = True
        if how in (_stdlib.SHUT_WR, _stdlib.SHUT_RDWR):
            _net.shutdown(self._id)

    def _decref_socketios(self):
        if self._io_refs > 0:
            self._io_refs -= 1
        if self._closed:
            self.close()

    def _real_close(self):
        if self._id is not None:
            _net.close(self._id)
        self._id = None

    def close(self):
        self._closed = True
        if self._io_refs <= 0:
            self._real_close()

    def detach(self):
        raise OSError(_errno.EOPNOTSUPP, "detach() is not supported: the connection has no file descriptor")

    def dup(self):
        raise OSError(_errno.EOPNOTSUPP, "dup() is not supported: the connection has no file descriptor")

    def _move_to(self, other):
        """Hand the connection to `other` (an SSL socket) and leave this object closed."""
        other._id, self._id = self._id, None
        other._peer, other._local = self._peer, self._local
        other._timeout = self._timeout
        other._options = dict(self._options)
        self._closed = True

    def __del__(self):
        try:
            self._real_close()
        except Exception:
            pass

    makefile = _STDLIB_SOCKET.makefile


def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
    """Resolve `host` through the host; only names on --allow-net may be resolved."""
    if host is None:
        host = "localhost" if not flags & getattr(_stdlib, "AI_PASSIVE", 1) else "0.0.0.0"
    if isinstance(host, bytes):
        host = host.decode("idna")
    port = _service_port(port)
    if type not in (0, _stdlib.SOCK_STREAM):
        return []
    result = _json.loads(_net.resolve(host))
    if not result["ok"]:
        _raise_failure(result)
    entries = []
    # IPv4 first: servers set up for local tests often listen on 127.0.0.1 only.
    for version, address in sorted(result["addresses"], key=lambda item: item[0]):
        af = _stdlib.AF_INET6 if version == 6 else _stdlib.AF_INET
        if family not in (0, _stdlib.AF_UNSPEC, af):
            continue
        sockaddr = (address, port, 0, 0) if version == 6 else (address, port)
        entries.append(
            (_stdlib.AddressFamily(af), _stdlib.SocketKind.SOCK_STREAM, _stdlib.IPPROTO_TCP, "", sockaddr)
        )
    return entries


_SERVICES = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "redis": 6379, "smtp": 25}


def _service_port(port):
    if port is None:
        return 0
    if isinstance(port, bytes):
        port = port.decode()
    if isinstance(port, str):
        if port.isdigit():
            return int(port)
        if port in _SERVICES:
            return _SERVICES[port]
        raise _stdlib.gaierror(getattr(_stdlib, "EAI_SERVICE", -8), "Servname not supported for ai_socktype")
    return int(port)


def gethostbyname(host):
    for entry in getaddrinfo(host, 0, _stdlib.AF_INET):
        return entry[4][0]
    raise _stdlib.gaierror(getattr(_stdlib, "EAI_NONAME", -2), "Name or service not known")


def gethostbyname_ex(host):
    addresses = [entry[4][0] for entry in getaddrinfo(host, 0, _stdlib.AF_INET)]
    return host, [], addresses


def socketpair(family=None, type=None, proto=0):
    raise OSError(_errno.EOPNOTSUPP, "socketpair() is not supported: " + _UNSUPPORTED)


def fromfd(fd, family, type, proto=0):
    raise OSError(_errno.EOPNOTSUPP, "fromfd() is not supported: " + _UNSUPPORTED)
