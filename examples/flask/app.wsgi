"""WSGI entry point of the Flask example."""

import os
import sys

# The server puts this folder first on sys.path; other WSGI hosts may not.
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from site_app import app as application  # noqa: E402
