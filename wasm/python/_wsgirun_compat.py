"""Fill the gaps of Pyodide's browser build before the application is imported.

`install()` runs when an isolate starts, and again after a memory snapshot
is restored, so it may run twice in one interpreter. It puts the
host-backed modules of this folder in place of the standard ones (socket,
ssl, sqlite3, fcntl) and turns the calls that cannot work in an isolate
(threads, subprocesses, C extensions built for another platform) into
exceptions and log lines that name what to do instead.

The host's JavaScript modules (`_wsgirun_net`, `_wsgirun_sqlite`,
`_wsgirun_posix`, `_wsgirun_log`) are imported only when first used, through
`HostModule`. A memory snapshot cannot hold references to JavaScript
objects, so a snapshot taken after `install()` stays possible as long as the
application does not use the network or a database while it is imported.
"""

import errno
import importlib
import importlib.machinery
import importlib.util
import os
import sys

FOLDER = os.path.dirname(os.path.abspath(__file__))


class HostModule:
    """A host module looked up at each use, so that no reference to it outlives a snapshot."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attribute):
        module = sys.modules.get(self._name) or importlib.import_module(self._name)
        return getattr(module, attribute)


_log = HostModule("_wsgirun_log")


def log(level, message):
    """Write a line to the server's error log."""
    try:
        _log.log(level, message)
    except ImportError:
        # The snapshot builder registers no host modules. It logs standard
        # output at info and standard error at warning.
        print(message, file=sys.stderr if level in ("warning", "error", "critical") else sys.stdout)


def install(uid, gid, pid=None):
    """Install everything; `uid`, `gid` and `pid` are what os.getuid(), os.getgid() and os.getpid() return."""
    if FOLDER in sys.path:
        sys.path.remove(FOLDER)
    sys.path.insert(0, FOLDER)

    import _wsgirun_socket

    _wsgirun_socket.install()
    _forget_stdlib_versions(["ssl", "sqlite3", "sqlite3.dbapi2", "pwd", "grp", "resource"])
    _install_fcntl()
    _set_identity(uid, gid, pid)
    _tidy_environment()
    _leave_event_loop()
    _add_key_derivation()
    _forbid_threads()
    _forbid_processes()
    _install_extension_check()


def _forget_stdlib_versions(names):
    """Drop modules imported before this folder was on sys.path, so the next import finds ours."""
    for name in names:
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None) or ""
        if module is not None and not origin.startswith(FOLDER + "/"):
            del sys.modules[name]


def _install_fcntl():
    # Pyodide 314 builds a fcntl module into the interpreter, and built-in
    # modules win over files on sys.path. Its locks lock nothing, so ours
    # replaces it and passes the other commands on to it.
    if getattr(sys.modules.get("fcntl"), "_wsgirun", False):
        return
    native = None
    if "fcntl" in sys.builtin_module_names:
        sys.modules.pop("fcntl", None)
        native = importlib.import_module("fcntl")
    spec = importlib.util.spec_from_file_location("fcntl", os.path.join(FOLDER, "fcntl.py"))
    module = importlib.util.module_from_spec(spec)
    module._native = native
    sys.modules["fcntl"] = module
    spec.loader.exec_module(module)


def _set_identity(uid, gid, pid):
    # Pyodide 314 reads the uid from Deno, which the isolate's permissions
    # reject, and the rejection ends the interpreter. The host passes the
    # numbers it read instead.
    os.getuid = os.geteuid = lambda: uid
    os.getgid = os.getegid = lambda: gid
    # Emscripten's getpid() returns 42 in every isolate of every process.
    if pid is not None:
        os.getpid = lambda: pid


def _tidy_environment():
    # Emscripten sets "_" to the path of the JavaScript file that started the
    # interpreter, a path of the server's machine that is no setting of the
    # application.
    os.environ.pop("_", None)
    # Pyodide sets PYTHONINSPECT for its interactive console, which a server does not have.
    os.environ.pop("PYTHONINSPECT", None)


def _leave_event_loop():
    # Pyodide marks its browser event loop (WebLoop) as running at all times.
    # Requests here run synchronously, outside any loop, and libraries check
    # for a running loop to refuse blocking calls (Django's ORM raises
    # SynchronousOnlyOperation). asyncio.get_event_loop() still returns the
    # WebLoop.
    import asyncio

    asyncio._set_running_loop(None)


def _add_key_derivation():
    # Python 3.12+ takes these two from OpenSSL only, which Pyodide lacks.
    import hashlib

    crypto = HostModule("_wsgirun_crypto")

    if not hasattr(hashlib, "pbkdf2_hmac"):

        def pbkdf2_hmac(hash_name, password, salt, iterations, dklen=None):
            if iterations < 1:
                raise ValueError("iteration value must be greater than 0.")
            length = dklen if dklen is not None else hashlib.new(hash_name).digest_size
            if length < 1:
                raise ValueError("key length must be greater than 0.")
            return crypto.pbkdf2_hmac(hash_name, bytes(password), bytes(salt), iterations, length).to_bytes()

        hashlib.pbkdf2_hmac = pbkdf2_hmac

    if not hasattr(hashlib, "scrypt"):

        def scrypt(password, *, salt, n, r, p, maxmem=0, dklen=64):
            return crypto.scrypt(bytes(password), bytes(salt), n, r, p, maxmem, dklen).to_bytes()

        hashlib.scrypt = scrypt


def _forbid_threads():
    import threading

    if getattr(threading.Thread.start, "_wsgirun", False):
        return

    def start(self):
        target = getattr(self, "_target", None)
        what = getattr(target, "__qualname__", None) or self.name
        message = (
            "cannot start thread %r (%s): a wsgirun isolate runs Python on one thread. Do the "
            "work within the request, or in a separate service outside wsgirun; to serve "
            "requests in parallel, raise --threads" % (self.name, what)
        )
        log("warning", message)
        raise RuntimeError(message)

    start._wsgirun = True
    threading.Thread.start = start


def _forbid_processes():
    import subprocess

    if getattr(subprocess.Popen.__init__, "_wsgirun", False):
        return

    def popen_init(self, args, *rest, **kwargs):
        message = (
            "cannot start the subprocess %r: a wsgirun isolate cannot run programs. Call a "
            "Python library instead, or run the program in a separate service outside wsgirun"
            % (args,)
        )
        log("warning", message)
        # Popen.__del__ runs on this half-made object and reads the flag.
        self._child_created = False
        raise OSError(errno.ENOSYS, message)

    popen_init._wsgirun = True
    # Pyodide's Popen raises in __init__, before _execute_child, with "emscripten does not
    # support processes". This check comes first and names what to do instead.
    subprocess.Popen.__init__ = popen_init

    def fork():
        message = "os.fork() cannot work in a wsgirun isolate; to serve requests in parallel, raise --threads"
        log("warning", message)
        raise OSError(errno.ENOSYS, message)

    os.fork = fork

    def no_programs(family):
        def run(command, *rest, **kwargs):
            if isinstance(command, (bytes, bytearray)):
                command = os.fsdecode(command)
            message = (
                "cannot run %r with %s: a wsgirun isolate cannot run programs. Call a "
                "Python library instead, or run the program in a separate service outside "
                "wsgirun" % (command, family)
            )
            log("warning", message)
            raise OSError(errno.ENOSYS, message)

        return run

    # Pyodide's os.system() ends the interpreter with a fatal error, and the
    # exec family would replace it. The other os.exec*() functions call
    # execv(), execve() or _execvpe(), which tries each folder of PATH, and
    # os.spawn*() call _spawnvef().
    os.system = no_programs("os.system()")
    os.execv = os.execve = no_programs("os.exec*()")
    if hasattr(os, "_execvpe"):
        exec_path = no_programs("os.exec*()")
        os._execvpe = lambda file, args, env=None: exec_path(file)
    if hasattr(os, "_spawnvef"):
        spawn = no_programs("os.spawn*()")
        os._spawnvef = lambda mode, file, args, env, function: spawn(file)


_ELF_MAGIC = b"\x7fELF"
_WASM_MAGIC = b"\0asm"


def _foreign_extension_message(fullname, path):
    return (
        "cannot import %s: %s is a C extension built for another platform, and Pyodide can "
        "only load extensions built for WebAssembly (wasm32-emscripten). Use the package's "
        "pure-Python version or a Pyodide build of it" % (fullname, path)
    )


def _log_foreign_extension(message):
    # Many packages (MarkupSafe's speedups, for one) try their C extension and
    # fall back to pure Python on ImportError, so this is no warning: a package
    # that does not fall back shows the message in its traceback.
    log("info", message + " (a package that falls back to pure Python works without it)")


class _ForeignExtensionFinder:
    """The last finder on sys.meta_path: explains a module that exists only as a foreign C extension."""

    _wsgirun = True
    # Compiled module files of each folder. Failed imports are common (optional
    # dependencies), so each folder is listed only once.
    _extensions_by_folder = {}

    @classmethod
    def _extensions(cls, folder):
        found = cls._extensions_by_folder.get(folder)
        if found is None:
            try:
                entries = os.listdir(folder or ".")
            except OSError:
                entries = []
            found = [entry for entry in entries if entry.endswith((".so", ".pyd"))]
            cls._extensions_by_folder[folder] = found
        return found

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        name = fullname.rpartition(".")[2]
        for folder in path if path is not None else sys.path:
            if not isinstance(folder, str):
                continue
            for entry in cls._extensions(folder):
                if entry.startswith(name + "."):
                    message = _foreign_extension_message(fullname, os.path.join(folder, entry))
                    _log_foreign_extension(message)
                    raise ModuleNotFoundError(message, name=fullname)
        return None


def _install_extension_check():
    if not any(getattr(finder, "_wsgirun", False) for finder in sys.meta_path):
        sys.meta_path.append(_ForeignExtensionFinder)

    loader = importlib.machinery.ExtensionFileLoader
    if getattr(loader.create_module, "_wsgirun", False):
        return
    original = loader.create_module

    def create_module(self, spec):
        # A plain ".so" file matches Pyodide's extension suffixes even when it
        # was built for x86; check its magic number before Pyodide loads it.
        try:
            with open(self.path, "rb") as file:
                magic = file.read(4)
        except OSError:
            magic = _WASM_MAGIC
        if magic != _WASM_MAGIC:
            message = _foreign_extension_message(spec.name, self.path)
            _log_foreign_extension(message)
            raise ImportError(message, name=spec.name, path=self.path)
        return original(self, spec)

    create_module._wsgirun = True
    loader.create_module = create_module
