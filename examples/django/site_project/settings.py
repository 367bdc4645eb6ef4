"""Settings of the Django example: no database, sessions in signed cookies."""

import os

# The session and messages cookies are signed with this key. Every isolate of the app must
# use the same key, so it is not generated at start. Set DJANGO_SECRET_KEY for anything
# beyond trying the example.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-secret-key-change-me")

DEBUG = os.environ.get("DJANGO_DEBUG") == "1"

ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

# Only apps that need no database tables.
INSTALLED_APPS = [
    "django.contrib.messages",
    "guestbook",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
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
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {}

# The session lives in a signed cookie, so it needs neither a database nor a cache shared
# between isolates.
SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"

# pytz reads every zone except UTC from /usr/share/zoneinfo, and inside Pyodide that folder
# contains only the UTC files that pytz_support.py writes.
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
