"""Telemetry: subscribe to pgbroker's events, and export them as OpenTelemetry metrics.

    BROKER_URL=pgbroker://user:pass@host/db python telemetry.py

Handlers run in the process where an event happens, so a real deployment subscribes
in its app module (imported by workers, their pool children and beats). This script
runs its worker in-process (Celery's test worker) to show every step in one place:
it publishes a task that succeeds, one that retries then succeeds, one that fails,
and prints each event as it arrives; then the OpenTelemetry metrics, when
``opentelemetry-sdk`` is installed (``pip install pgbroker[otel] opentelemetry-sdk``).
"""
from __future__ import annotations

import os
import sys
import threading

from celery import Celery
from celery.contrib.testing.worker import start_worker

from pgbroker import telemetry
from pgbroker.worker import install

URL = os.environ.get("BROKER_URL", "pgbroker://localhost/shop")
app = Celery("telemetry-example", broker=URL, backend=URL)
app.conf.update(broker_transport_options={"schema": os.environ.get("PGBROKER_SCHEMA", "pgbroker")},
                task_acks_late=True)
lock = threading.Lock()


def show(name, measurements, metadata):
    numbers = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in measurements.items())
    with lock:
        print(f"{name:<14} {metadata.get('task') or '':<28} {numbers}")


telemetry.subscribe(show, ["job.enqueued", "job.started", "job.completed", "job.retried", "job.failed"])


@app.task(name="example.greet")
def greet(name):
    return f"hello {name}"


@app.task(name="example.flaky", bind=True, max_retries=2)
def flaky(self):
    if self.request.retries < 1:
        raise self.retry(exc=ConnectionError("upstream busy"), countdown=0.2)
    return "ok on retry"


@app.task(name="example.broken")
def broken():
    raise ValueError("bad input")


def main() -> int:
    metrics = None
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        import pgbroker.otel

        metrics = InMemoryMetricReader()
        pgbroker.otel.install(MeterProvider(metric_readers=[metrics]))
    except ImportError:
        print("(opentelemetry-sdk not installed: events only)")
    install(app)  # what `celery worker` does for a pgbroker app
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False, shutdown_timeout=10):
        results = [greet.delay("ann"), flaky.delay(), broken.delay()]
        values = [r.get(timeout=30, propagate=False) for r in results][:2]
        with lock:
            print("results:", values)
    if metrics is not None:
        data = metrics.get_metrics_data()
        counts = {m.name: sum(p.value for p in m.data.data_points) for rm in data.resource_metrics
                  for sm in rm.scope_metrics for m in sm.metrics if not m.name.count(".") > 2}
        print("otel counters:", {k: v for k, v in sorted(counts.items()) if v})
    return 0


if __name__ == "__main__":
    sys.exit(main())
