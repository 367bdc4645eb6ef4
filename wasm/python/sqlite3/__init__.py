"""SQLite for wsgirun isolates: Python's `sqlite3` interface over the host's SQLite.

See dbapi2.py. The database file is shared safely with other isolates and
processes, because the host's SQLite locks it.
"""

from sqlite3.dbapi2 import *  # noqa: F401,F403
from sqlite3.dbapi2 import LEGACY_TRANSACTION_CONTROL  # noqa: F401
