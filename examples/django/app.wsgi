"""WSGI entry point of the Django example."""

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

application = get_wsgi_application()
