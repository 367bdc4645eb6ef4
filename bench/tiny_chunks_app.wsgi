"""A response of many one-byte chunks, as many as the query string says (100 000 by default)."""


def application(environ, start_response):
    count = int(environ["QUERY_STRING"] or "100000")
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return (b"x" for _ in range(count))
