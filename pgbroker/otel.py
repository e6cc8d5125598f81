"""OpenTelemetry bridge: pgbroker's telemetry events as OpenTelemetry metrics.

Needs ``pip install pgbroker[otel]`` (``opentelemetry-api``; configure an SDK and an
exporter as usual)::

    import pgbroker.otel
    pgbroker.otel.install()          # the global meter provider, or install(meter_provider)

Each event ``E`` (see :data:`pgbroker.telemetry.EVENTS`) becomes a counter
``pgbroker.E`` (one per event), and each of its measurements ``M`` a histogram
``pgbroker.E.M`` (seconds for ``duration``, ``queue_time``, ``lateness``, ``delay``;
a count or bytes otherwise). Attributes are the event's low-cardinality metadata:
``queue``, ``task``, ``entry`` (never ids, errors or times).
"""
from __future__ import annotations

from typing import Any, Callable

from . import __version__, telemetry

__all__ = ["install", "ATTRIBUTES"]

#: Metadata keys carried as metric attributes (bounded sets of values).
ATTRIBUTES = ("queue", "task", "entry")
_SECONDS = {"duration", "queue_time", "lateness", "delay"}


def install(meter_provider: Any = None) -> Callable[[], None]:
    """Record every pgbroker event as metrics; returns a function that stops it."""
    from opentelemetry import metrics

    provider = meter_provider or metrics.get_meter_provider()
    meter = provider.get_meter("pgbroker", __version__)
    counters, histograms = {}, {}
    for event in telemetry.EVENTS.values():
        counters[event.name] = meter.create_counter(f"pgbroker.{event.name}", unit="1", description=event.doc)
        for m in event.measurements:
            histograms[(event.name, m)] = meter.create_histogram(
                f"pgbroker.{event.name}.{m}", unit="s" if m in _SECONDS else ("By" if m == "size" else "1"))

    def record(name: str, measurements, metadata) -> None:
        attributes = {k: metadata[k] for k in ATTRIBUTES if metadata.get(k) is not None}
        counters[name].add(1, attributes)
        for key, value in measurements.items():
            if value is not None:
                histograms[(name, key)].record(value, attributes)

    return telemetry.subscribe(record)
