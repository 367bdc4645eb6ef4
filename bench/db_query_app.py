"""Benchmark application: a Flask view that runs one PostgreSQL query per request.

The same file runs under wsgirun (Pyodide) and under gunicorn (native CPython).
Each thread keeps one pg8000 connection: an isolate has one thread, and a
gunicorn gthread worker has several.
"""

import os
import random
import threading

import pg8000
from flask import Flask, jsonify

DATABASE = {
    "host": "127.0.0.1",
    "port": int(os.environ.get("BENCH_PG_PORT", "55432")),
    "user": "wsgirun",
    "password": "wsgirun",
    "database": "wsgirun",
}
ROWS = 1000

app = Flask(__name__, root_path=os.path.dirname(os.path.abspath(__file__)))
_local = threading.local()


def connection():
    if getattr(_local, "connection", None) is None:
        _local.connection = pg8000.connect(**DATABASE)
        _local.connection.autocommit = True
    return _local.connection


@app.route("/item")
def item():
    cursor = connection().cursor()
    cursor.execute("SELECT id, name FROM bench_items WHERE id = %s", (random.randint(1, ROWS),))
    row_id, name = cursor.fetchone()
    return jsonify(id=row_id, name=name)


application = app
