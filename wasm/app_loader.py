"""Locate and import the WSGI application inside an isolate.

This module must not touch the host functions: it is imported before an
application memory snapshot is taken, and a snapshot cannot contain
references to JavaScript objects. wasm/adapter.py imports it after the
restore and finds the application already imported.
"""

import os
import re
import sys


class _Settings:
    """What the worker told this isolate at start (see `configure`)."""

    app_name = "app"
    script_path = None
    module = None
    callable_name = "application"
    multiprocess = True


settings = _Settings()
_application = None


def configure(app_name, script_path, module, callable_name, python_path, multiprocess):
    """Record the application's location and put its folders on sys.path."""
    settings.app_name = app_name
    settings.script_path = script_path or None
    settings.module = module or None
    settings.callable_name = callable_name
    settings.multiprocess = bool(multiprocess)
    for folder in reversed(list(python_path)):
        if folder in sys.path:
            sys.path.remove(folder)
        sys.path.insert(0, folder)
    _read_path_files(python_path)
    if python_path:
        os.chdir(python_path[0])


def _read_path_files(python_path):
    """Process the .pth files of the python-path folders, as mod_wsgi does.

    The folders they name go right after the python-path folders, ahead of
    the standard library.
    """
    import site

    before = set(sys.path)
    for folder in python_path:
        site.addsitedir(folder)
    added = [entry for entry in sys.path if entry not in before]
    for entry in added:
        sys.path.remove(entry)
    position = len(python_path)
    sys.path[position:position] = added


def flush_standard_streams():
    """Flush print() output and standard error; an application may have replaced them."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _load_script(path):
    """Execute a WSGI script file as a fresh module, as mod_wsgi does."""
    import types

    name = "_wsgirun_script_" + re.sub(r"\W", "_", os.path.basename(path))
    module = types.ModuleType(name)
    module.__file__ = path
    sys.modules[name] = module
    try:
        with open(path, "rb") as file:
            source = file.read()
        code = compile(source, path, "exec")
        exec(code, module.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


# Standard library modules that Python 3.13 removed (most by PEP 594), and names of
# the ast module that Python 3.14 removed, which older frameworks still use.
_REMOVED_MODULES = {
    "aifc", "audioop", "cgi", "cgitb", "chunk", "crypt", "imghdr", "mailcap", "msilib",
    "nis", "nntplib", "ossaudiodev", "pipes", "sndhdr", "spwd", "sunau", "telnetlib",
    "uu", "xdrlib", "lib2to3",
}
_REMOVED_AST_NAMES = {"Num", "Str", "Bytes", "NameConstant", "Ellipsis"}


def _removed_from_python(error):
    """Return a hint for an import that failed on a name this Python removed, else None."""
    version = "%d.%d" % sys.version_info[:2]
    advice = (
        "this isolate runs Python %s; run the application on Python 3.12 "
        "(--python 3.12, or python=3.12 for a daemon group)" % version
    )
    if isinstance(error, ModuleNotFoundError) and sys.version_info >= (3, 13):
        if (error.name or "").split(".")[0] in _REMOVED_MODULES:
            return "The module %r was removed in Python 3.13: %s" % (error.name, advice)
    if isinstance(error, AttributeError) and sys.version_info >= (3, 14):
        match = re.match(r"module 'ast' has no attribute '(\w+)'", str(error))
        if match and match.group(1) in _REMOVED_AST_NAMES:
            return "ast.%s was removed in Python 3.14: %s" % (match.group(1), advice)
    return None


def load_application():
    """Import the application once; a failed import is retried next time."""
    global _application
    if _application is not None:
        return _application

    try:
        if settings.script_path:
            module = _load_script(settings.script_path)
            where = "script %r" % settings.script_path
        else:
            import importlib

            module = importlib.import_module(settings.module)
            where = "module %r" % settings.module
    except (ImportError, AttributeError) as error:
        hint = _removed_from_python(error)
        if hint:
            error.add_note(hint)
        raise
    finally:
        # Text printed at import without a final newline is logged now, not
        # with a later request (or kept in an application snapshot).
        flush_standard_streams()

    application = getattr(module, settings.callable_name, None)
    if application is None:
        raise LookupError(
            "%s defines no %r; define it or name the callable with --callable-object"
            % (where, settings.callable_name)
        )
    if not callable(application):
        raise TypeError("%r in %s is not callable" % (settings.callable_name, where))
    _application = application
    return application
