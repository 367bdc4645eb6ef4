"""Read the request body in 64 KiB reads, discard it and return its size in bytes.

The benchmark posts 1 GiB to this app to check that the server streams
wsgi.input instead of buffering the body.
"""

READ_SIZE = 64 * 1024


def application(environ, start_response):
    stream = environ["wsgi.input"]
    # PEP 3333 lets an app read only CONTENT_LENGTH bytes; without the header
    # (a chunked body) the server signals the end with an empty read.
    declared = environ.get("CONTENT_LENGTH")
    remaining = int(declared) if declared else None
    total = 0
    while remaining is None or remaining > 0:
        size = READ_SIZE if remaining is None else min(READ_SIZE, remaining)
        chunk = stream.read(size)
        if not chunk:
            break
        total += len(chunk)
        if remaining is not None:
            remaining -= len(chunk)

    body = f"{total}\n".encode()
    start_response(
        "200 OK",
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
    )
    return [body]
