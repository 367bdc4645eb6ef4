"""Settings of the Django example: SQLite in a writable folder, sessions in signed cookies."""

import os

BASE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The SQLite database lives here. The server must let the isolates write to this folder:
# --write examples/django/data. Pages that use no database work without it.
DATA_DIR = os.environ.get("DJANGO_DATA_DIR", os.path.join(BASE_DIR, "data"))

# The session and messages cookies are signed with this key. Every isolate of the app must
# use the same key, so it is not generated at start. Set DJANGO_SECRET_KEY for anything
# beyond trying the example.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-secret-key-change-me")

DEBUG = os.environ.get("DJANGO_DEBUG") == "1"

ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.messages",
    "guestbook",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "site_project.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# wsgirun's sqlite3 locks the file for real, so every isolate (and daemon process) can
# use the same database.
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(DATA_DIR, "db.sqlite3"),
    }
}

DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

# The session lives in a signed cookie, so it needs neither a database table nor a cache
# shared between isolates.
SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"

# pytz reads its zones from /usr/share/zoneinfo, which wsgirun shows inside the isolates
# when the host has it (pytz_support.py covers hosts without one, with UTC only).
TIME_ZONE = "UTC"
USE_TZ = True

# Django loads no translation catalogs.
USE_I18N = False
USE_L10N = False

# The server serves this folder itself: --url-alias /static examples/django/static
STATIC_URL = "/static/"

# With DEBUG off, Django's default logging sends request errors only to e-mail, so a 500
# would leave no trace. This sends them to stderr instead.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django": {"handlers": ["console"], "level": "WARNING"}},
}
