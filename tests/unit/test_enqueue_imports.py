"""pgbroker.atomic() imports a framework only when handed one of its objects."""
from __future__ import annotations

import subprocess
import sys


def test_no_framework_is_imported_unless_used():
    code = (
        "import sys, pgbroker, pgbroker.enqueue, pgbroker.db, pgbroker.transport, pgbroker.backend\n"
        "try:\n"
        "    pgbroker.atomic(object()).__enter__()\n"
        "except TypeError:\n"
        "    pass\n"
        # (Celery itself imports django.utils when Django is installed: we look at django.db)
        "print(sorted(m for m in ('django.db', 'sqlalchemy', 'psycopg2') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
