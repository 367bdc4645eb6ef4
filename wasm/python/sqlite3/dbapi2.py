"""DB-API 2.0 interface for SQLite databases in wsgirun isolates.

This module takes the place of Python's `sqlite3` inside isolates, with its
interface: connections and cursors, transactions with the legacy
`isolation_level` rule (an implicit BEGIN before INSERT, UPDATE, DELETE and
REPLACE) or `autocommit`, adapters and converters, `Row`, SQL functions and
aggregates written in Python, and the DB-API exception classes.

The host runs SQLite (Deno's `node:sqlite`) on the real file behind the
database's path, so its locks work across isolates and processes. The file
must be in a folder the application may write (`--write DIR`); a database in
a read-only folder opens read-only.

Not supported, and raising NotSupportedError: collations, window functions,
authorizers, progress handlers, blob I/O, loading extensions, `iterdump`,
and `backup` into a file database.
"""

import collections.abc as _abc
import datetime as _datetime
import json as _json
import re as _re
import time as _time

from _wsgirun_compat import HostModule as _HostModule
from sqlite3._host_version import SQLITE_VERSION as sqlite_version

_host = _HostModule("_wsgirun_sqlite")

paramstyle = "qmark"
threadsafety = 1
apilevel = "2.0"

version = "2.6.0"
version_info = (2, 6, 0)
sqlite_version_info = tuple(int(part) for part in sqlite_version.split("."))

PARSE_DECLTYPES = 1
PARSE_COLNAMES = 2
LEGACY_TRANSACTION_CONTROL = -1

SQLITE_OK = 0
SQLITE_DENY = 1
SQLITE_IGNORE = 2

# Result codes of the host module.
_ROWS = 0
_DONE = 1
_FAILED = -1
_FIX_FLOAT = 0
_FIX_BLOB = 1
_FIX_BIG_INTEGER = 2

_SAFE_INTEGER = 2**53

# A statement that starts with INSERT, UPDATE, DELETE or REPLACE, after comments.
_DML = _re.compile(r"^(\s+|--[^\n]*\n|/\*.*?\*/)*(insert|update|delete|replace)\b", _re.I | _re.S)
_ISOLATION_LEVELS = ("", "DEFERRED", "IMMEDIATE", "EXCLUSIVE")


class Warning(Exception):
    pass


class Error(Exception):
    sqlite_errorcode = None
    sqlite_errorname = None


class InterfaceError(Error):
    pass


class DatabaseError(Error):
    pass


class DataError(DatabaseError):
    pass


class OperationalError(DatabaseError):
    pass


class IntegrityError(DatabaseError):
    pass


class InternalError(DatabaseError):
    pass


class ProgrammingError(DatabaseError):
    pass


class NotSupportedError(DatabaseError):
    pass


_ERRORS = {
    cls.__name__: cls
    for cls in (InterfaceError, DatabaseError, DataError, OperationalError, IntegrityError,
                InternalError, ProgrammingError, NotSupportedError)
}


def _raise(result):
    raise _ERRORS.get(result[1], OperationalError)(result[2])


Date = _datetime.date
Time = _datetime.time
Timestamp = _datetime.datetime
Binary = memoryview


def DateFromTicks(ticks):
    return Date(*_time.localtime(ticks)[:3])


def TimeFromTicks(ticks):
    return Time(*_time.localtime(ticks)[3:6])


def TimestampFromTicks(ticks):
    return Timestamp(*_time.localtime(ticks)[:6])


class PrepareProtocol:
    """The protocol that adapters are registered for, as in CPython."""


adapters = {}
converters = {}


def register_adapter(type, adapter):
    adapters[(type, PrepareProtocol)] = adapter


def register_converter(name, converter):
    converters[name.upper()] = converter


def adapt(obj, proto=PrepareProtocol, alt=None):
    adapter = adapters.get((type(obj), proto))
    if adapter is not None:
        return adapter(obj)
    conform = getattr(obj, "__conform__", None)
    if conform is not None:
        adapted = conform(proto)
        if adapted is not None:
            return adapted
    if alt is not None:
        return alt
    raise ProgrammingError("can't adapt")


def complete_statement(statement):
    """Return whether `statement` ends with a semicolon outside strings and comments."""
    text = _re.sub(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/", " ", statement, flags=_re.S)
    if "'" in text or '"' in text or "/*" in text:
        return False
    return text.rstrip().endswith(";")


def enable_callback_tracebacks(flag):
    pass


def _register_default_adapters():
    # CPython registers these; 3.12 deprecates them but they still apply.
    register_adapter(_datetime.date, lambda value: value.isoformat())
    register_adapter(_datetime.datetime, lambda value: value.isoformat(" "))
    register_converter("date", lambda value: _datetime.date(*map(int, value.split(b"-"))))
    register_converter("timestamp", _convert_timestamp)


def _convert_timestamp(value):
    day, clock = value.split(b" ")
    year, month, day = map(int, day.split(b"-"))
    clock, _, fraction = clock.partition(b".")
    hours, minutes, seconds = map(int, clock.split(b":"))
    microseconds = int("{:0<6.6}".format(fraction.decode())) if fraction else 0
    return _datetime.datetime(year, month, day, hours, minutes, seconds, microseconds)


_register_default_adapters()


class Row:
    """A row that can be read by index or by case-insensitive column name."""

    def __init__(self, cursor, data):
        if not isinstance(cursor, Cursor):
            raise TypeError("Row() argument 1 must be sqlite3.Cursor")
        self._names = [column[0] for column in cursor.description or ()]
        self._data = tuple(data)

    def keys(self):
        return list(self._names)

    def __getitem__(self, key):
        if isinstance(key, str):
            folded = key.casefold()
            for index, name in enumerate(self._names):
                if name.casefold() == folded:
                    return self._data[index]
            raise IndexError("No item with that key")
        return self._data[key]

    def __len__(self):
        return len(self._data)

    def __iter__(self):
        return iter(self._data)

    def __eq__(self, other):
        if not isinstance(other, Row):
            return NotImplemented
        return self._names == other._names and self._data == other._data

    def __hash__(self):
        return hash((tuple(self._names), self._data))

    def __repr__(self):
        return "<sqlite3.Row object at %#x>" % id(self)


# String literals, quoted names and comments, which may contain text that looks like a parameter.
_QUOTED_OR_COMMENT = _re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|`[^`]*`|\[[^\]]*\]|--[^\n]*|/\*.*?\*/", _re.S)
_NAMED_PARAMETER = _re.compile(r"[:@$]([A-Za-z_][A-Za-z0-9_]*)")
_names_by_sql = {}


def _parameter_names(sql):
    """Return the distinct named parameters of `sql` (:name, @name or $name), in order."""
    names = _names_by_sql.get(sql)
    if names is None:
        code = _QUOTED_OR_COMMENT.sub(" ", sql)
        names = list(dict.fromkeys(_NAMED_PARAMETER.findall(code)))
        if len(_names_by_sql) >= 256:
            _names_by_sql.clear()
        _names_by_sql[sql] = names
    return names


def _converter_name(declared_type):
    """Return the converter key of a declared column type: its first word, as CPython cuts it."""
    if not declared_type:
        return None
    return _re.split(r"[\s(]", declared_type.strip(), 1)[0].upper()


def _as_bytes(value):
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()


class Connection:
    """A connection to one database file, kept open by the host."""

    Warning = Warning
    Error = Error
    InterfaceError = InterfaceError
    DatabaseError = DatabaseError
    DataError = DataError
    OperationalError = OperationalError
    IntegrityError = IntegrityError
    InternalError = InternalError
    ProgrammingError = ProgrammingError
    NotSupportedError = NotSupportedError

    def __init__(
        self,
        database,
        timeout=5.0,
        detect_types=0,
        isolation_level="",
        check_same_thread=True,
        factory=None,
        cached_statements=128,
        uri=False,
        *,
        autocommit=LEGACY_TRANSACTION_CONTROL,
    ):
        import os

        self._id = None
        if isinstance(database, bytes):
            database = database.decode()
        database = os.fspath(database)
        if database != ":memory:" and database and not (uri and database.startswith("file:")):
            database = os.path.abspath(database)
        result = _host.open(database, float(timeout), bool(uri), int(cached_statements))
        if result[0] == _FAILED:
            _raise(result)
        self._id = result[0]
        self._database = database
        self._detect_types = detect_types
        self._isolation_level = None
        self.isolation_level = isolation_level
        self._autocommit = LEGACY_TRANSACTION_CONTROL
        self.autocommit = autocommit
        self.row_factory = None
        self.text_factory = str
        self._proxies = []

    def __del__(self):
        if getattr(self, "_id", None) is not None:
            _host.close(self._id)

    def _check(self):
        if self._id is None:
            raise ProgrammingError("Cannot operate on a closed database.")

    # -- transactions ------------------------------------------------------

    @property
    def isolation_level(self):
        return self._isolation_level

    @isolation_level.setter
    def isolation_level(self, value):
        if value is not None:
            if not isinstance(value, str):
                raise TypeError("isolation_level must be str or None, not %s" % type(value).__name__)
            if value.upper() not in _ISOLATION_LEVELS:
                raise ValueError(
                    "isolation_level string must be '', 'DEFERRED', 'IMMEDIATE', or 'EXCLUSIVE'"
                )
        elif self._id is not None and self.in_transaction:
            # Turning the implicit transactions off commits the open one, as in CPython.
            self._run_simple("COMMIT")
        self._isolation_level = value

    @property
    def autocommit(self):
        return self._autocommit

    @autocommit.setter
    def autocommit(self, value):
        if value not in (True, False, LEGACY_TRANSACTION_CONTROL):
            raise ValueError("autocommit must be True, False, or sqlite3.LEGACY_TRANSACTION_CONTROL")
        self._check()
        if value is True and self.in_transaction:
            self._run_simple("COMMIT")
        self._autocommit = value
        if value is False and not self.in_transaction:
            self._run_simple("BEGIN")

    @property
    def in_transaction(self):
        self._check()
        return bool(_host.in_transaction(self._id))

    def _implicit_begin(self, sql):
        """Return the BEGIN statement Python's legacy transaction rule runs before `sql`, or ''."""
        if self._autocommit is not LEGACY_TRANSACTION_CONTROL or self._isolation_level is None:
            return ""
        if not _DML.match(sql):
            return ""
        return ("BEGIN " + self._isolation_level).rstrip()

    def _run_simple(self, sql):
        result = _host.execute(self._id, sql, "", "", "")
        if result[0] == _FAILED:
            _raise(result.to_py())

    def commit(self):
        self._check()
        if self.in_transaction:
            self._run_simple("COMMIT")
        if self._autocommit is False:
            self._run_simple("BEGIN")

    def rollback(self):
        self._check()
        if self.in_transaction:
            self._run_simple("ROLLBACK")
        if self._autocommit is False:
            self._run_simple("BEGIN")

    def close(self):
        if self._id is None:
            return
        if self._autocommit is False and self.in_transaction:
            self._run_simple("ROLLBACK")
        _host.close(self._id)
        self._id = None
        for proxy in self._proxies:
            proxy.destroy()
        self._proxies = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        if exc_type is None:
            self.commit()
        else:
            self.rollback()
        return False

    # -- statements ------------------------------------------------------

    def cursor(self, factory=None):
        self._check()
        cursor = (factory or Cursor)(self)
        if not isinstance(cursor, Cursor):
            raise TypeError("factory must return a cursor, not %s" % type(cursor).__name__)
        if self.row_factory is not None and cursor.row_factory is None:
            cursor.row_factory = self.row_factory
        return cursor

    def execute(self, sql, parameters=()):
        return self.cursor().execute(sql, parameters)

    def executemany(self, sql, parameters):
        return self.cursor().executemany(sql, parameters)

    def executescript(self, sql_script):
        return self.cursor().executescript(sql_script)

    @property
    def total_changes(self):
        return self.execute("SELECT total_changes()").fetchone()[0]

    def interrupt(self):
        # A statement never runs while Python does, so there is nothing to interrupt.
        pass

    # -- Python callbacks --------------------------------------------------

    def _keep(self, function):
        from pyodide.ffi import create_proxy

        proxy = create_proxy(function)
        self._proxies.append(proxy)
        return proxy

    def create_function(self, name, narg, func, *, deterministic=False):
        self._check()
        if func is None:
            raise NotSupportedError("removing a SQL function is not supported in wsgirun isolates")
        call = self._keep(_function_adapter(func))
        result = _host.create_function(self._id, name, bool(deterministic), call)
        if result[0] == _FAILED:
            _raise(result.to_py())

    def create_aggregate(self, name, n_arg, aggregate_class):
        self._check()
        start, step, finish = _aggregate_adapters(aggregate_class)
        result = _host.create_aggregate(self._id, name, self._keep(start), self._keep(step), self._keep(finish))
        if result[0] == _FAILED:
            _raise(result.to_py())

    def create_window_function(self, name, num_params, aggregate_class):
        raise NotSupportedError("window functions written in Python are not supported in wsgirun isolates")

    def create_collation(self, name, callable):
        raise NotSupportedError("collations written in Python are not supported in wsgirun isolates")

    def set_authorizer(self, authorizer_callback):
        if authorizer_callback is not None:
            raise NotSupportedError("authorizers are not supported in wsgirun isolates")

    def set_progress_handler(self, progress_handler, n):
        if progress_handler is not None:
            raise NotSupportedError("progress handlers are not supported in wsgirun isolates")

    def set_trace_callback(self, trace_callback):
        if trace_callback is not None:
            raise NotSupportedError("trace callbacks are not supported in wsgirun isolates")

    def enable_load_extension(self, enabled):
        raise NotSupportedError("loading SQLite extensions is not allowed in wsgirun isolates")

    def load_extension(self, path, *, entrypoint=None):
        raise NotSupportedError("loading SQLite extensions is not allowed in wsgirun isolates")

    def blobopen(self, *args, **kwargs):
        raise NotSupportedError("blob I/O is not supported in wsgirun isolates")

    def iterdump(self, *args, **kwargs):
        raise NotSupportedError("iterdump() is not supported in wsgirun isolates")

    # -- whole databases -------------------------------------------------

    def serialize(self, *, name="main"):
        self._check()
        data = _host.serialize(self._id, name)
        return bytes(data.to_py()) if data is not None else b""

    def deserialize(self, data, /, *, name="main"):
        self._check()
        result = _host.deserialize(self._id, data, name)
        if result[0] == _FAILED:
            _raise(result.to_py())

    def backup(self, target, *, pages=-1, progress=None, name="main", sleep=0.250):
        """Copy the database into `target`, which must be an in-memory connection."""
        if not isinstance(target, Connection):
            raise TypeError("backup() argument 'target' must be sqlite3.Connection")
        target._check()
        if target._database not in ("", ":memory:"):
            raise NotSupportedError("backup() can only copy into an in-memory database in wsgirun isolates")
        target.deserialize(self.serialize(name=name))
        if progress is not None:
            progress(0, 0, 0)


def _function_adapter(func):
    def call(kinds, *args):
        if kinds:
            args = _fix_arguments(kinds, args)
        return _encode_result(func(*args))

    return call


def _aggregate_adapters(aggregate_class):
    def start(kinds):
        return aggregate_class()

    def step(kinds, instance, *args):
        if kinds:
            args = _fix_arguments(kinds[1:], args)
        instance.step(*args)

    def finish(kinds, instance):
        return _encode_result(instance.finalize())

    return start, step, finish


def _fix_arguments(kinds, args):
    """Give SQL function arguments the Python types CPython would (see host_sqlite.ts)."""
    fixed = list(args)
    for index, kind in enumerate(kinds):
        if kind == "f":
            fixed[index] = float(fixed[index])
        elif kind == "b":
            fixed[index] = fixed[index].to_bytes()
        elif kind == "I":
            fixed[index] = int(fixed[index])
    return fixed


def _encode_result(value):
    """Tag results that JavaScript cannot carry unchanged: integers (else REAL) and bytes."""
    if value is None or isinstance(value, float):
        return value
    if isinstance(value, int):
        return "\0i%d" % value
    if isinstance(value, str):
        return "\0s" + value if value.startswith("\0") else value
    if isinstance(value, (bytes, bytearray, memoryview)):
        from pyodide.ffi import to_js

        return to_js(bytes(value))
    raise TypeError("a SQL function returned %s; return None, int, float, str or bytes" % type(value).__name__)


class Cursor:
    """A cursor over the rows of the last statement it executed."""

    def __init__(self, connection):
        if not isinstance(connection, Connection):
            raise TypeError("Cursor() argument must be sqlite3.Connection")
        self._connection = connection
        self.arraysize = 1
        self.row_factory = None
        self._reset()
        self.lastrowid = None
        self._closed = False

    def _reset(self):
        self.description = None
        self.rowcount = -1
        self._rows = []
        self._position = 0
        self._cursor_id = 0
        self._converters = None

    @property
    def connection(self):
        return self._connection

    def _check(self):
        if self._closed:
            raise ProgrammingError("Cannot operate on a closed cursor.")
        self._connection._check()

    def close(self):
        self._release()
        self._closed = True

    def _release(self):
        if self._cursor_id:
            _host.release(self._cursor_id)
            self._cursor_id = 0

    def setinputsizes(self, sizes):
        pass

    def setoutputsize(self, size, column=None):
        pass

    # -- execution ---------------------------------------------------------

    def _bind(self, sql, parameters):
        """Return (kinds, names_json, values) for the host; see host_sqlite.ts for the kinds."""
        names = ""
        if isinstance(parameters, _abc.Mapping):
            keys = _parameter_names(sql)
            for key in keys:
                if key not in parameters:
                    raise ProgrammingError("You did not supply a value for binding parameter :%s." % key)
            values = [parameters[key] for key in keys]
            names = _json.dumps(keys)
        elif isinstance(parameters, (list, tuple)) or (
            isinstance(parameters, _abc.Sequence) and not isinstance(parameters, (str, bytes))
        ):
            values = list(parameters)
        else:
            raise ProgrammingError("parameters are of unsupported type")
        kinds = []
        for position, value in enumerate(values, 1):
            if adapters and (type(value), PrepareProtocol) in adapters:
                value = adapters[(type(value), PrepareProtocol)](value)
            elif hasattr(value, "__conform__"):
                value = adapt(value, PrepareProtocol, value)
            kind = type(value)
            if value is None:
                kinds.append("n")
            elif kind is int or kind is bool or (isinstance(value, int) and not isinstance(value, float)):
                value = int(value)
                if -_SAFE_INTEGER < value < _SAFE_INTEGER:
                    kinds.append("i")
                else:
                    if not -(2**63) <= value < 2**63:
                        raise OverflowError("Python int too large to convert to SQLite INTEGER")
                    kinds.append("I")
                    value = str(value)
            elif isinstance(value, float):
                kinds.append("f")
                value = float(value)
            elif isinstance(value, str):
                kinds.append("s")
                value = str(value)
            elif isinstance(value, (bytes, bytearray, memoryview)):
                kinds.append("b")
            else:
                raise ProgrammingError(
                    "Error binding parameter %d: type '%s' is not supported" % (position, type(value).__name__)
                )
            values[position - 1] = value
        return "".join(kinds), names, values

    def execute(self, sql, parameters=()):
        self._check()
        if not isinstance(sql, str):
            raise TypeError("execute() argument 1 must be str, not %s" % type(sql).__name__)
        self._release()
        self._reset()
        connection = self._connection
        kinds, names, values = self._bind(sql, parameters)
        begin = connection._implicit_begin(sql)
        result = _host.execute(connection._id, sql, begin, kinds, names, *values).to_py()
        self._take_result(result)
        return self

    def _take_result(self, result):
        code = result[0]
        if code == _FAILED:
            _raise(result)
        _, names, declared_types, values, fixes, cursor_id, changes, lastrowid = result
        if changes >= 0:
            self.rowcount = changes
            self.lastrowid = lastrowid
        if not names:
            return
        detect = self._connection._detect_types
        self.description = tuple((self._column_name(name, detect), None, None, None, None, None, None) for name in names)
        self._converters = self._find_converters(names, declared_types, detect)
        self._cursor_id = cursor_id if code == _ROWS else 0
        self._rows = self._make_rows(values, fixes, len(names))

    @staticmethod
    def _column_name(name, detect):
        if detect & PARSE_COLNAMES and " [" in name:
            return name.split(" [", 1)[0]
        return name

    @staticmethod
    def _find_converters(names, declared_types, detect):
        if not detect or not converters:
            return None
        found = []
        for name, declared in zip(names, declared_types):
            converter = None
            if detect & PARSE_COLNAMES:
                match = _re.search(r"\[([^\]]+)\]", name)
                if match:
                    converter = converters.get(match.group(1).upper())
            if converter is None and detect & PARSE_DECLTYPES:
                converter = converters.get(_converter_name(declared))
            found.append(converter)
        return found if any(found) else None

    def _make_rows(self, values, fixes, width):
        for index in range(0, len(fixes), 2):
            position, kind = fixes[index], fixes[index + 1]
            if kind == _FIX_FLOAT:
                values[position] = float(values[position])
            elif kind == _FIX_BLOB:
                values[position] = bytes(values[position])
            elif kind == _FIX_BIG_INTEGER:
                values[position] = int(values[position])
        text_factory = self._connection.text_factory
        if text_factory is not str:
            values = [
                (value.encode() if text_factory is bytes else text_factory(value.encode()))
                if isinstance(value, str) else value
                for value in values
            ]
        converters_ = self._converters
        if converters_ is not None:
            values = list(values)
            for position, value in enumerate(values):
                converter = converters_[position % width]
                if converter is not None and value is not None:
                    values[position] = converter(_as_bytes(value))
        return [tuple(values[start:start + width]) for start in range(0, len(values), width)]

    def executemany(self, sql, seq_of_parameters):
        self._check()
        if not isinstance(sql, str):
            raise TypeError("executemany() argument 1 must be str, not %s" % type(sql).__name__)
        self._release()
        self._reset()
        connection = self._connection
        total = 0
        begin = connection._implicit_begin(sql)
        for parameters in seq_of_parameters:
            kinds, names, values = self._bind(sql, parameters)
            result = _host.execute(connection._id, sql, begin, kinds, names, *values).to_py()
            if result[0] == _FAILED:
                _raise(result)
            if result[1]:
                raise ProgrammingError("executemany() can only execute DML statements.")
            if result[6] >= 0:
                total += result[6]
        self.rowcount = total if _DML.match(sql) else -1
        return self

    def executescript(self, sql_script):
        self._check()
        if not isinstance(sql_script, str):
            raise ValueError("script argument must be unicode.")
        self._release()
        self._reset()
        connection = self._connection
        if connection._autocommit is LEGACY_TRANSACTION_CONTROL and connection.in_transaction:
            connection._run_simple("COMMIT")
        result = _host.exec(connection._id, sql_script)
        if result[0] == _FAILED:
            _raise(result.to_py())
        return self

    # -- fetching ------------------------------------------------------

    def _fetch_more(self):
        if not self._cursor_id:
            return False
        result = _host.fetch(self._cursor_id).to_py()
        if result[0] == _FAILED:
            self._cursor_id = 0
            _raise(result)
        if result[0] == _DONE:
            self._cursor_id = 0
        self._rows = self._rows[self._position:] + self._make_rows(result[1], result[2], len(self.description))
        self._position = 0
        return True

    def _next_raw(self):
        while self._position >= len(self._rows):
            if not self._fetch_more():
                return None
        row = self._rows[self._position]
        self._position += 1
        return row

    def _shape(self, row):
        factory = self.row_factory
        return row if factory is None else factory(self, row)

    def fetchone(self):
        self._check()
        row = self._next_raw()
        return None if row is None else self._shape(row)

    def fetchmany(self, size=None):
        self._check()
        size = self.arraysize if size is None else size
        rows = []
        while len(rows) < size:
            row = self._next_raw()
            if row is None:
                break
            rows.append(self._shape(row))
        return rows

    def fetchall(self):
        self._check()
        rows = []
        while True:
            row = self._next_raw()
            if row is None:
                return rows
            rows.append(self._shape(row))

    def __iter__(self):
        return self

    def __next__(self):
        row = self.fetchone()
        if row is None:
            raise StopIteration
        return row

    def __del__(self):
        try:
            self._release()
        except Exception:
            pass


def connect(database, timeout=5.0, detect_types=0, isolation_level="", check_same_thread=True,
            factory=Connection, cached_statements=128, uri=False, *, autocommit=LEGACY_TRANSACTION_CONTROL):
    """Open a connection to the SQLite database file `database` (or ":memory:")."""
    return factory(
        database,
        timeout,
        detect_types,
        isolation_level,
        check_same_thread,
        factory,
        cached_statements,
        uri,
        autocommit=autocommit,
    )
