"""PEP 3333 adapter that runs inside every wsgirun isolate.

The worker calls `handle()` once per request. Everything the application
sees (environ, wsgi.input, start_response, write, wsgi.errors,
wsgi.file_wrapper) is built here, and every response goes out through the
host functions of the `_wsgirun_host` module that the worker registers:

    start(status, header_lines, body, complete)  status line and headers (names
                         and values joined by newlines)
    send(chunk)          one body chunk; blocks while the client is slow and
                         raises once the client has gone
    cancelled()          whether the front cancelled the request (client gone,
                         body timeout, server stopping)
    cancel_reason()      why, as a sentence for the log
    send_file(path, offset, length)  the front sends a host file region
    finish(error)        end of the response (error: abort the connection)
    read(size)           up to `size` request body bytes, None at the end
    log(level, message)  a line in the server's error log
    stream_level(level)  the level of the standard-stream lines that follow
                         (None: each stream's own)
    open_file_host_path(fd)  the host path of the file open as fd, while that
                         path still leads to it; else None

Validation follows what waitress and mod_wsgi enforce, because Deno's HTTP
server must never see an invalid status or header (a control byte in a
header value crashes the whole Deno process).
"""

import io
import json
import logging
import os
import re
import sys
import time
import traceback

from _wsgirun_app_loader import configure, flush_standard_streams, load_application, settings  # noqa: F401 (the worker calls configure)

# The `_wsgirun_host` module, bound by connect_host() in each isolate. Memory
# snapshots import this adapter, and a snapshot cannot keep a JavaScript module.
host = None


def connect_host():
    """Binds the host functions of the isolate that runs this interpreter."""
    global host
    import _wsgirun_host

    host = _wsgirun_host


_spinning_sleep = time.sleep
# CPython keeps times as 64-bit nanoseconds and rejects longer sleeps with OverflowError.
_MAX_SLEEP = 2**63 / 1e9


def _sleep(seconds):
    """Block like time.sleep() without using the CPU.

    Pyodide's own time.sleep() spins on the CPU for the whole time in a worker
    (Pyodide 0.27.8 and 314.0.8). The host blocks the thread on a futex
    instead, and raises KeyboardInterrupt when the pool interrupts the isolate.
    """
    if host is None or not isinstance(seconds, (int, float)):
        # Before connect_host(), or for argument types the original converts or rejects.
        return _spinning_sleep(seconds)
    if seconds != seconds or seconds < 0 or seconds >= _MAX_SLEEP:
        # The original raises the usual ValueError or OverflowError for these.
        return _spinning_sleep(seconds)
    host.sleep(float(seconds))


# Set before any application is imported, so `from time import sleep` gets it too.
time.sleep = _sleep


def _level_name(levelno):
    """Return the server's level for a `logging` level number."""
    for floor, name in ((50, "critical"), (40, "error"), (30, "warning"), (20, "info")):
        if levelno >= floor:
            return name
    return "debug"


_plain_emit = logging.StreamHandler.emit


def _emit_at_level(handler, record):
    """Write a record like StreamHandler.emit, at the record's level when it goes to standard output or error.

    Without it, every line an application logs to standard error would be a
    WARNING line, so `--log-level error` would hide its errors and show its
    debug records. Records written to files stay as they are.
    """
    stream = getattr(handler, "stream", None)
    # The streams the worker set up, which redirect_stderr() and the like leave as they are.
    if host is None or (stream is not sys.__stderr__ and stream is not sys.__stdout__):
        return _plain_emit(handler, record)
    flush_standard_streams()
    host.stream_level(_level_name(record.levelno))
    try:
        _plain_emit(handler, record)
    finally:
        flush_standard_streams()
        host.stream_level(None)


# Set on the class, so that every StreamHandler writes this way, whenever it was made.
logging.StreamHandler.emit = _emit_at_level

# A header name is an RFC 9110 token.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Control characters Deno rejects or crashes on; tab is allowed.
_BAD_VALUE_CHAR = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_STATUS = re.compile(r"^([1-9][0-9]{2}) ([^\x00-\x08\x0a-\x1f\x7f]*)$")

# Hop-by-hop headers belong to one connection, which the server owns. The
# adapter drops those an application sets, as gunicorn does.
_HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    )
)

# Deno's Headers get slower with each distinct name, and the front builds them on
# its main thread: 40 000 names stalled every request for seconds.
_MAX_HEADERS = 1000
# Header lines in all, in characters: 1000 headers of 64 KiB each slowed every request.
_MAX_HEADER_CHARS = 1024 * 1024
# The front reads Content-Length as a JavaScript number, exact up to 2**53 - 1.
_MAX_CONTENT_LENGTH = 2**53 - 1

_INPUT_CHUNK = 65536


class ErrorStream:
    """`wsgi.errors`: text written here becomes error-log lines of the request."""

    def __init__(self, request_id=None):
        self._request_id = request_id
        self._pending = ""

    def write(self, text):
        if not isinstance(text, str):
            raise TypeError("wsgi.errors.write() takes str, not %s" % type(text).__name__)
        self._pending += text
        while "\n" in self._pending:
            line, self._pending = self._pending.split("\n", 1)
            host.log("error", line)
        return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        if self._pending:
            host.log("error", self._pending)
            self._pending = ""


def _is_cancellation(error):
    """Return whether `error` is the adapter's own signal that the front stopped the request."""
    return getattr(error, "wsgirun_request_stopped", False) or getattr(error, "name", None) == "RequestCancelled"


class InputStream:
    """`wsgi.input` over the request body, which the front streams in.

    Reads block until the client has sent enough bytes. The stream never
    reads past the body because the front only ever writes the body's own
    bytes and then marks the end.
    """

    def __init__(self, body):
        # body: the whole body as bytes when the front read it ahead, else None.
        self._buffer = bytearray(body) if body else bytearray()
        self._position = 0
        self._eof = body is not None

    def _fill(self, want):
        """Pull chunks from the host until `want` bytes are buffered or the body ends."""
        while not self._eof and len(self._buffer) - self._position < want:
            try:
                chunk = host.read(_INPUT_CHUNK)
            except Exception as error:
                # The host raises a JavaScript RequestCancelled when the client
                # stops sending. Applications expect OSError from a failed
                # read, as mod_wsgi and gunicorn raise it.
                if getattr(error, "name", None) != "RequestCancelled":
                    raise
                stopped = OSError("request body read failed: %s" % error.message)
                # A plain OSError in tracebacks, but the adapter can tell it apart.
                stopped.wsgirun_request_stopped = True
                raise stopped from None
            if chunk is None:
                self._eof = True
                break
            if self._position:
                del self._buffer[: self._position]
                self._position = 0
            self._buffer += chunk.to_bytes()

    def _take(self, size):
        end = min(len(self._buffer), self._position + size)
        data = bytes(self._buffer[self._position : end])
        self._position = end
        return data

    def read(self, size=-1):
        if size is None or size < 0:
            while not self._eof:
                self._fill(len(self._buffer) - self._position + _INPUT_CHUNK)
            return self._take(len(self._buffer))
        self._fill(size)
        return self._take(size)

    def readline(self, size=-1):
        limit = None if size is None or size < 0 else size
        scanned = self._position
        while True:
            newline = self._buffer.find(b"\n", scanned)
            if newline >= 0:
                end = newline + 1
                break
            buffered = len(self._buffer) - self._position
            if limit is not None and buffered >= limit:
                end = self._position + limit
                break
            if self._eof:
                end = len(self._buffer)
                break
            scanned = len(self._buffer)
            before = self._position
            self._fill(buffered + 1)
            scanned -= before - self._position
        if limit is not None:
            end = min(end, self._position + limit)
        return self._take(end - self._position)

    def readlines(self, hint=-1):
        lines = []
        total = 0
        while True:
            line = self.readline()
            if not line:
                break
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                break
        return lines

    def __iter__(self):
        return self

    def __next__(self):
        line = self.readline()
        if not line:
            raise StopIteration
        return line


class FileWrapper:
    """`wsgi.file_wrapper`: the front sends real files itself, without Python."""

    def __init__(self, filelike, blksize=8192):
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self):
        return self

    def __next__(self):
        data = self.filelike.read(self.blksize)
        if data:
            return data
        raise StopIteration


# Passing bytes to a JavaScript function costs a buffer proxy (tens of
# microseconds). A Latin-1 str crosses as a plain string, one character per
# byte, so it is cheaper up to a few KiB.
_SMALL_BODY = 4096

# Maximum body bytes that one message from the isolate carries. A larger
# list body streams, and a larger chunk goes out in pieces, so that no single
# message between the isolate, a daemon process and the front carries it whole
# (the front rejects daemon frames above a few times this size).
_MESSAGE_BODY_LIMIT = 4 * 1024 * 1024


def _to_host(data):
    """Return `data` in the cheapest form for the host functions."""
    if data is not None and len(data) <= _SMALL_BODY:
        return data.decode("latin-1")
    return data


class ResponseError(Exception):
    """The application broke the WSGI contract; the client gets a 500."""


def _check_status(status):
    # Subclasses of str, list and tuple pass, as in mod_wsgi and gunicorn:
    # an enum.StrEnum member or Django's SafeString is a str.
    if not isinstance(status, str):
        raise ResponseError("status must be a str, not %s" % type(status).__name__)
    match = _STATUS.match(status)
    if not match:
        raise ResponseError(
            "invalid status %r: expected a 3-digit code, a space and a reason phrase" % status
        )
    code = int(match.group(1))
    if not 200 <= code <= 599:
        raise ResponseError("status %r is outside 200-599, which WSGI applications may send" % status)
    return code


# Lower-case names of the hop-by-hop headers this isolate has dropped and logged.
_dropped_hop_by_hop = set()


def _drop_hop_by_hop(name):
    """Log the first drop of each hop-by-hop header in this isolate."""
    if name.lower() in _dropped_hop_by_hop:
        return
    _dropped_hop_by_hop.add(name.lower())
    host.log(
        "warning",
        "dropped the hop-by-hop header %r that the application set, because the server "
        "manages the connection (logged once per isolate and header)" % name,
    )


def _check_headers(headers):
    if not isinstance(headers, list):
        raise ResponseError("headers must be a list, not %s" % type(headers).__name__)
    if len(headers) > _MAX_HEADERS:
        raise ResponseError(
            "%d headers; a response may have at most %d" % (len(headers), _MAX_HEADERS)
        )
    flat = []
    size = 0
    for item in headers:
        if not isinstance(item, tuple) or len(item) != 2:
            raise ResponseError("each header must be a (name, value) tuple, got %r" % (item,))
        name, value = item
        if not isinstance(name, str) or not _TOKEN.match(name):
            raise ResponseError("invalid header name %r" % (name,))
        if not isinstance(value, str):
            raise ResponseError(
                "header %r has a %s value; values must be str" % (name, type(value).__name__)
            )
        # The host receives plain str, without a subclass's own __str__.
        name = str.__str__(name)
        value = str.__str__(value)
        if _BAD_VALUE_CHAR.search(value):
            raise ResponseError("header %r has a control character in its value %r" % (name, value))
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            raise ResponseError(
                "header %r value %r is not Latin-1; encode it (RFC 8187 or percent-encoding)"
                % (name, value)
            ) from None
        if name.lower() in _HOP_BY_HOP:
            _drop_hop_by_hop(name)
            continue
        size += len(name) + len(value) + 4
        if size > _MAX_HEADER_CHARS:
            raise ResponseError(
                "the headers exceed %d characters in all; send large data in the body"
                % _MAX_HEADER_CHARS
            )
        flat.append(name)
        flat.append(value.strip(" \t"))
    return flat


class Response:
    """The state of one response: what start_response set and what went out."""

    def __init__(self, method):
        self.method = method
        self.status = None
        self.code = 0
        self.headers = None
        self.headers_sent = False
        self.content_length = None
        self.overflow_logged = False
        self.bytes_sent = 0
        self.finished = False

    @property
    def body_allowed(self):
        return self.method != "HEAD" and self.code not in (204, 205, 304) and self.code >= 200

    def start_response(self, status, headers, exc_info=None):
        if exc_info:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response() was already called; pass exc_info to call it again")

        code = _check_status(status)
        flat = _check_headers(headers)
        self.status, self.code, self.headers = str.__str__(status), code, flat
        self.content_length = None
        repeats = []
        for index in range(0, len(flat), 2):
            if flat[index].lower() == "content-length":
                value = flat[index + 1]
                # RFC 9110 allows decimal digits only. int() also accepts "+5"
                # and "1_0", and Deno drops such a header from the response.
                if not (value.isascii() and value.isdigit()):
                    raise ResponseError("invalid Content-Length %r: expected decimal digits only" % value)
                length = int(value)
                if length > _MAX_CONTENT_LENGTH:
                    raise ResponseError(
                        "Content-Length %s is larger than %d, the largest the server sends"
                        % (value, _MAX_CONTENT_LENGTH)
                    )
                if self.content_length is not None and self.content_length != length:
                    raise ResponseError(
                        "conflicting Content-Length headers %d and %d" % (self.content_length, length)
                    )
                if self.content_length is not None:
                    # Deno would join an identical repeat into "5, 5" and drop both.
                    repeats.append(index)
                self.content_length = length
        for index in reversed(repeats):
            del flat[index : index + 2]
        return self.write

    def _limit(self, data):
        """Cut `data` so the body never exceeds the declared Content-Length."""
        if self.content_length is None:
            return data
        room = self.content_length - self.bytes_sent
        if len(data) <= room:
            return data
        self._log_overflow()
        return data[: max(room, 0)]

    def _log_overflow(self):
        if self.overflow_logged:
            return
        self.overflow_logged = True
        host.log(
            "warning",
            "the application sent more than the %d bytes its Content-Length declared; "
            "the rest is not sent" % self.content_length,
        )

    def _start(self, body, complete):
        if self.status is None:
            raise AssertionError("the application returned without calling start_response()")
        self.headers_sent = True
        host.start(self.code, "\n".join(self.headers), _to_host(body), complete)
        if body:
            self.bytes_sent += len(body)
        if complete:
            self.finished = True

    def write(self, data):
        """Send `data` at once: the `write()` callable that start_response returns."""
        if type(data) not in (bytes, bytearray, memoryview):
            raise TypeError("write() takes bytes, not %s" % type(data).__name__)
        self.send(bytes(data))

    def send(self, data):
        if self.status is None:
            raise AssertionError("the application sent body data before calling start_response()")
        if not self.body_allowed:
            data = b""
        data = self._limit(data)
        if not self.headers_sent:
            first = data[:_MESSAGE_BODY_LIMIT]
            self._start(first or None, False)
            data = data[len(first) :]
        for offset in range(0, len(data), _MESSAGE_BODY_LIMIT):
            piece = data[offset : offset + _MESSAGE_BODY_LIMIT]
            host.send(_to_host(piece))
            self.bytes_sent += len(piece)

    @property
    def length_reached(self):
        return self.content_length is not None and self.bytes_sent >= self.content_length


def _error_response(response, message):
    """Send a plain 500 for errors that happen before any byte went out."""
    body = b"Internal Server Error\n"
    response.status, response.code = "500 Internal Server Error", 500
    response.headers = ["Content-Type", "text/plain; charset=utf-8", "Content-Length", str(len(body))]
    response.content_length = len(body)
    response._start(body, True)


def build_environ(environ_json, body, streamed, request_id, errors):
    environ = json.loads(environ_json)
    environ["wsgi.version"] = (1, 0)
    # body: a JS Uint8Array when the front read a non-empty body ahead.
    if streamed:
        environ["wsgi.input"] = InputStream(None)
    else:
        environ["wsgi.input"] = InputStream(body.to_bytes() if body is not None else b"")
    # The front always marks the end of the body, chunked or not.
    environ["wsgi.input_terminated"] = True
    environ["wsgi.errors"] = errors
    # One request at a time per isolate; other isolates are other interpreters.
    environ["wsgi.multithread"] = False
    environ["wsgi.multiprocess"] = settings.multiprocess
    environ["wsgi.run_once"] = False
    environ["wsgi.file_wrapper"] = FileWrapper
    environ["wsgirun.request_id"] = request_id
    return environ


# Frames of a logged traceback, the innermost ones. An application that
# raised the recursion limit can fail 100 000 frames deep. Before this
# limit, such a request took 26 s to get its 500 (3.3 s at 20 000 frames,
# Pyodide 314.0.8 on 2 cores), nearly all of it in formatting the frames.
_TRACEBACK_FRAMES = 100


_OWN_FILES = (__file__, sys.modules["_wsgirun_app_loader"].__file__)


def _log_exception(prefix):
    error_type, error, frames = sys.exc_info()
    # The adapter's and the loader's frames come first, and the application's code is below them.
    while frames is not None and frames.tb_next is not None and frames.tb_frame.f_code.co_filename in _OWN_FILES:
        frames = frames.tb_next
    text = "".join(traceback.format_exception(error_type, error, frames, limit=-_TRACEBACK_FRAMES)).rstrip()
    host.log("error", prefix + "\n" + text)


# File objects that open() returns in binary mode. The front reopens the file
# by its path after handle() has closed it, so wrappers that delete their file
# on close (tempfile.NamedTemporaryFile) are iterated in Python instead.
_PLAIN_FILES = (io.BufferedReader, io.BufferedRandom, io.FileIO)


def _send_file(response, wrapper):
    """Hand a real file's remaining bytes to the front; False if it is no real file."""
    filelike = wrapper.filelike
    if type(filelike) not in _PLAIN_FILES or filelike.closed:
        return False
    # By the open descriptor, not the name: after os.chdir() or a rename the
    # name leads elsewhere, and a replaced file is read in Python instead.
    path = host.open_file_host_path(filelike.fileno())
    if path is None:
        return False
    offset = filelike.tell()
    length = -1
    if response.content_length is not None:
        length = max(response.content_length - response.bytes_sent, 0)
    if not response.headers_sent:
        response._start(None, False)
    if response.body_allowed:
        host.send_file(path, offset, length)
        if length >= 0:
            # The front sends these bytes; count them so the Content-Length
            # check after the iteration does not see a short body.
            response.bytes_sent += length
    return True


def _iterate(response, result):
    if isinstance(result, FileWrapper) and response.status is not None and _send_file(response, result):
        return
    for chunk in result:
        if type(chunk) is not bytes:
            if isinstance(chunk, (bytearray, memoryview)):
                chunk = bytes(chunk)
            else:
                raise TypeError("the application yielded %s; WSGI bodies are bytes" % type(chunk).__name__)
        if not chunk:
            continue
        response.send(chunk)
        if response.headers_sent and (not response.body_allowed or response.length_reached):
            # Nothing more may be sent: stop early instead of running the rest.
            break


def _fast_body(result, response):
    """Return the whole body of a list or tuple response as one bytes object, or None."""
    if type(result) not in (list, tuple) or response.status is None or response.headers_sent:
        return None
    parts = []
    size = 0
    for part in result:
        if type(part) is not bytes:
            return None
        parts.append(part)
        size += len(part)
    if size > _MESSAGE_BODY_LIMIT and response.body_allowed:
        if response.content_length is None:
            # The length is known, so a client still sees it in the streamed response.
            response.headers += ["Content-Length", str(size)]
            response.content_length = size
        return None
    body = b"".join(parts) if len(parts) != 1 else parts[0]
    if not response.body_allowed:
        if response.method == "HEAD" and response.content_length is None and response.code not in (204, 205, 304):
            # Tell a HEAD client the length a GET would have had.
            response.headers += ["Content-Length", str(len(body))]
        return b""
    if response.content_length is not None and len(body) != response.content_length:
        # Too long is cut below; too short must reach the front as a stream so
        # the connection is closed instead of Deno fixing the length.
        if len(body) < response.content_length:
            return None
        response._log_overflow()
        body = body[: response.content_length]
    return body


def handle(method, environ_json, body, streamed, request_id):
    """Run one request through the application; errors become responses and log lines."""
    errors = ErrorStream(request_id)
    response = Response(method)
    result = None
    try:
        try:
            application = load_application()
        except BaseException:
            _log_exception("failed to import the application; the next request retries")
            _error_response(response, "import failed")
            return

        environ = build_environ(environ_json, body, streamed, request_id, errors)
        result = application(environ, response.start_response)

        body_bytes = _fast_body(result, response)
        if body_bytes is not None:
            response._start(body_bytes, True)
            return

        _iterate(response, result)
        if not response.headers_sent:
            response._start(None, False)
        if response.content_length is not None and response.bytes_sent < response.content_length and response.body_allowed:
            host.log(
                "warning",
                "the application sent %d of the %d bytes its Content-Length declared; closing the connection"
                % (response.bytes_sent, response.content_length),
            )
            response.finished = True
            host.finish("short body: %d of %d bytes" % (response.bytes_sent, response.content_length))
            return
    except BaseException as error:
        if host.cancelled():
            # The front has stopped the request and responds to the client itself, so nothing is sent.
            # An exception of the application's own still gets its traceback.
            if not _is_cancellation(error):
                _log_exception("the application raised an exception")
            host.log("info", "%s; the request was stopped" % host.cancel_reason())
            response.finished = True
            host.finish("client disconnected")
            return
        if isinstance(error, ResponseError):
            host.log("error", "invalid response from the application: %s" % error)
        else:
            _log_exception("the application raised an exception")
        if not response.headers_sent:
            _error_response(response, str(error))
        elif not response.finished:
            response.finished = True
            host.finish("the application failed after the response started: %s" % error.__class__.__name__)
        return
    finally:
        errors.flush()
        if result is not None and hasattr(result, "close"):
            try:
                result.close()
            except BaseException:
                _log_exception("the response iterable's close() raised")
        # Text that close() wrote without a final newline.
        errors.flush()
        # The request's text without a final newline is logged with it.
        flush_standard_streams()
    if not response.finished:
        response.finished = True
        host.finish(None)
