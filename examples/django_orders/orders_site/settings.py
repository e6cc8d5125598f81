"""Settings of the Django orders example: one Postgres database holds the app's
tables and pgbroker's jobs and results (``DATABASE_URL``)."""
import os

from psycopg.conninfo import conninfo_to_dict

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://localhost/shop")
_db = conninfo_to_dict(DATABASE_URL)

SECRET_KEY = "example-only-not-secret"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
INSTALLED_APPS = ["orders"]
ROOT_URLCONF = "orders_site.urls"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _db.get("dbname"),
        "USER": _db.get("user", ""),
        "PASSWORD": _db.get("password", ""),
        "HOST": _db.get("host", ""),
        "PORT": _db.get("port", ""),
        # any other libpq parameter of the URL (sslmode, options, …)
        "OPTIONS": {k: v for k, v in _db.items() if k not in ("dbname", "user", "password", "host", "port")},
    }
}

# Celery: broker and results in the same database. With join_django_atomic, a
# .delay() inside transaction.atomic() joins that transaction: no pgbroker code in views.
CELERY_BROKER_URL = "pgbroker" + DATABASE_URL[len("postgresql"):]
CELERY_RESULT_BACKEND = CELERY_BROKER_URL
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "schema": os.environ.get("PGBROKER_SCHEMA", "pgbroker"),
    "join_django_atomic": True,
}
CELERY_TASK_ACKS_LATE = True
