"""Expose the WSGI callable of a mod_wsgi-style script file to gunicorn.

gunicorn imports a module by name, so it cannot load a script such as app.wsgi
directly. Run gunicorn with `wsgi_script_loader:application` and set
WSGI_SCRIPT to the script's path. As under wsgirun and mod_wsgi, the
script's own folder comes first on sys.path.
"""

import os
import runpy
import sys

SCRIPT = os.environ.get("WSGI_SCRIPT")
if not SCRIPT:
    raise RuntimeError("WSGI_SCRIPT is not set; set it to the path of the WSGI script file to serve")

sys.path.insert(0, os.path.dirname(os.path.abspath(SCRIPT)))
application = runpy.run_path(SCRIPT)["application"]
