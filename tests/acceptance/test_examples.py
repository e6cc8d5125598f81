"""The examples a newcomer copies from keep working."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.acceptance


def test_demo_runs_to_completion(database_url):
    out = subprocess.run([sys.executable, "examples/demo.py"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PGBROKER_URL": database_url}, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "all jobs reached a final state" in out.stdout
    assert "-> 1050 cents" in out.stdout and "add.delay(20, 22).get() -> 42" in out.stdout
