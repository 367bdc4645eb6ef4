"""WSGI entry point of the Django example."""

import fcntl
import logging
import os
import sys

# The server puts this folder first on sys.path; other WSGI hosts may not.
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "site_project.settings")

from pytz_support import prepare_pytz  # noqa: E402

# Django imports pytz, which needs files that Pyodide lacks.
prepare_pytz()

from django.core.wsgi import get_wsgi_application  # noqa: E402

django_application = get_wsgi_application()

# The name of the admin user that create_admin() makes from the password file.
ADMIN_USER = "admin"


def prepare_database():
    """Apply the migrations and make the admin user, holding a file lock meanwhile.

    Every isolate and daemon process runs this on its first request. The lock
    makes them take turns, so the first one migrates and the others find
    nothing left to do.
    """
    from django.conf import settings
    from django.core.management import call_command

    with open(os.path.join(settings.DATA_DIR, "migrate.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        call_command("migrate", interactive=False, verbosity=0)
        create_admin(settings.DATA_DIR)


def create_admin(data_dir):
    """Create the admin user from data/admin-password, if that file exists."""
    from django.contrib.auth import get_user_model

    path = os.path.join(data_dir, "admin-password")
    if not os.path.exists(path):
        return
    users = get_user_model().objects
    if not users.filter(username=ADMIN_USER).exists():
        with open(path, encoding="utf-8") as file:
            users.create_superuser(ADMIN_USER, "", file.read().strip())


_database_prepared = False


def application(environ, start_response):
    global _database_prepared
    if not _database_prepared:
        # Tried once per interpreter: without a writable data folder the pages that use no
        # database still work, and the others fail with the database error.
        _database_prepared = True
        try:
            prepare_database()
        except Exception as error:
            logging.getLogger("django").warning(
                "the database is not ready (%s: %s); pages that use it fail. Run the server "
                "with --write examples/django/data",
                type(error).__name__,
                error,
            )
    return django_application(environ, start_response)
