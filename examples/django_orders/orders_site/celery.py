"""The project's Celery app, configured from Django settings (CELERY_* names), as usual."""
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orders_site.settings")

app = Celery("orders_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
