"""A small Flask site: a template page, a form, a file upload, a JSON API and a stream."""

import collections
import hashlib
import os
import sys

from flask import Flask, Response, abort, flash, jsonify, redirect, render_template, request, url_for

HERE = os.path.dirname(os.path.abspath(__file__))

# Flask derives its folder from the import system, which yields the working directory when
# the code runs as a script instead of an imported module (for example inside app.wsgi).
# Passing the folder keeps templates/ found in both cases.
app = Flask(__name__, root_path=HERE)
app.jinja_env.trim_blocks = True
app.jinja_env.lstrip_blocks = True

# The session cookie, which carries the flash messages, is signed with this key. Every
# isolate of the app must use the same key, so it is not generated at start. Set
# FLASK_SECRET_KEY for anything beyond trying the example.
app.secret_key = os.environ.get("FLASK_SECRET_KEY", "example-only-secret-key")

# The latest messages posted to this interpreter. Each isolate has its own copy, so with
# several isolates a page lists only the messages that its own isolate received.
MAX_KEPT_MESSAGES = 100
MESSAGES = collections.deque(maxlen=MAX_KEPT_MESSAGES)

MAX_MESSAGE_LENGTH = 1000
MAX_STREAM_LINES = 100_000
DEFAULT_STREAM_LINES = 10
HASH_CHUNK_SIZE = 64 * 1024


@app.get("/")
def index():
    return render_template(
        "index.html",
        messages=MESSAGES,
        python_version=sys.version.split()[0],
        platform=sys.platform,
    )


@app.post("/messages")
def post_message():
    text = request.form.get("message", "").strip()
    if not text:
        abort(400, description="The form field 'message' is missing or empty.")
    if len(text) > MAX_MESSAGE_LENGTH:
        abort(400, description=f"The message has {len(text)} characters, more than the limit of {MAX_MESSAGE_LENGTH}.")
    MESSAGES.append(text)
    # The submitted value goes into the session cookie, so the page after the redirect
    # shows it even when another isolate handles that request.
    flash(text)
    return redirect(url_for("show_messages"), code=303)


@app.get("/messages")
def show_messages():
    return render_template("messages.html", messages=MESSAGES)


@app.post("/upload")
def upload():
    uploaded = request.files.get("file")
    if uploaded is None:
        abort(400, description="The multipart form has no file field named 'file'.")
    size, digest = hash_stream(uploaded.stream)
    return render_template("upload.html", filename=uploaded.filename, size=size, sha256=digest)


@app.route("/api/data", methods=["GET", "POST"])
def api_data():
    if request.method == "GET":
        return jsonify(messages=list(MESSAGES), python=sys.version.split()[0], platform=sys.platform)
    # get_json raises a 400 error for a body that is not valid JSON.
    payload = request.get_json(force=True)
    return jsonify(received=payload)


@app.get("/stream")
def stream():
    count = parse_line_count(request.args.get("lines"))
    if count is None:
        abort(400, description=f"The query parameter 'lines' must be an integer from 0 to {MAX_STREAM_LINES}.")

    def generate():
        for number in range(1, count + 1):
            yield f"line {number} of {count}\n"

    return Response(generate(), mimetype="text/plain")


def parse_line_count(text):
    """Return the line count from the query string, or None when it is invalid."""
    if text is None:
        return DEFAULT_STREAM_LINES
    try:
        count = int(text)
    except ValueError:
        return None
    return count if 0 <= count <= MAX_STREAM_LINES else None


def hash_stream(stream):
    """Return the size in bytes and the sha256 hex digest of a binary stream, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    while True:
        chunk = stream.read(HASH_CHUNK_SIZE)
        if not chunk:
            break
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()
