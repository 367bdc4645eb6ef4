"""A small Bottle app: a plain page and a page rendered from a template string."""

import sys

import bottle

MAX_NAME_LENGTH = 100

GREETING_TEMPLATE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Hello</title></head>
<body>
  <h1>Hello, {{name}}!</h1>
  <p>Bottle {{bottle_version}} on Python {{python_version}}</p>
</body>
</html>
"""

app = bottle.Bottle()


@app.get("/")
def index():
    bottle.response.content_type = "text/plain; charset=utf-8"
    return "Bottle example. Try /hello?name=World\n"


@app.get("/hello")
def hello():
    # Bottle decodes query values as Latin-1 unless they are read through getunicode.
    name = bottle.request.query.getunicode("name", default="World")
    if len(name) > MAX_NAME_LENGTH:
        bottle.abort(400, f"The query parameter 'name' is longer than {MAX_NAME_LENGTH} characters.")
    # The {{...}} syntax of SimpleTemplate escapes HTML.
    return bottle.template(
        GREETING_TEMPLATE,
        name=name,
        bottle_version=bottle.__version__,
        python_version=sys.version.split()[0],
    )


application = app
