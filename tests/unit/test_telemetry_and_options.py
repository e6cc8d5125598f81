"""The telemetry catalogue is a contract; per-call options and queue controls reject bad input."""
from __future__ import annotations

import pytest

from pgbroker import telemetry
from pgbroker.engine import job_filter
from pgbroker.errors import InvalidJobOption, InvalidState, InvalidUnique
from pgbroker.jobs import parse_rate
from pgbroker.task import job_headers

JOB = ["job_id", "task_id", "task", "queue", "attempt"]

#: Changing a name or a key here is a breaking change for every subscriber: it needs
#: a major version and a note in the README's telemetry section.
CONTRACT = {
    "job.enqueued": (["size"], ["queue", "task", "task_id", "unique_duplicate"]),
    "job.claimed": (["queue_time"], JOB + ["consumer"]),
    "job.started": ([], JOB + ["worker"]),
    "job.completed": (["duration"], JOB + ["worker"]),
    "job.retried": (["delay"], JOB + ["worker", "error"]),
    "job.snoozed": (["delay"], JOB + ["worker"]),
    "job.failed": (["duration"], JOB + ["worker", "error"]),
    "job.discarded": ([], JOB + ["reason"]),
    "job.cancelled": (["cancelled", "revoked"], ["queue", "task", "by"]),
    "jobs.rescued": (["redelivered", "discarded", "completed", "dead_consumers", "duration"], ["consumer"]),
    "jobs.pruned": (["completed", "cancelled", "discarded", "fires", "duration"], ["consumer"]),
    "results.pruned": (["results", "counters", "duration"], ["schema"]),
    "beat.fired": (["lateness"], ["entry", "task", "task_id", "fire_at"]),
}


def test_the_event_catalogue_is_the_contract():
    actual = {name: (list(e.measurements), list(e.metadata)) for name, e in telemetry.EVENTS.items()}
    assert actual == CONTRACT


def test_subscribers_get_events_and_can_leave():
    seen = []
    leave = telemetry.subscribe(lambda *event: seen.append(event), ["beat.fired"])
    assert telemetry.enabled("beat.fired") and not telemetry.enabled("job.started")
    telemetry.emit("beat.fired", {"lateness": 0.5}, {"entry": "e", "task": "t", "task_id": "i", "fire_at": "x"})
    telemetry.emit("job.started", {}, {})  # nobody listens: nothing happens
    leave()
    telemetry.emit("beat.fired", {"lateness": 1.0}, {"entry": "e", "task": "t", "task_id": "i", "fire_at": "x"})
    assert seen == [("beat.fired", {"lateness": 0.5}, {"entry": "e", "task": "t", "task_id": "i", "fire_at": "x"})]
    assert not telemetry.enabled("beat.fired")


def test_a_failing_handler_neither_raises_nor_stops_the_others(caplog):
    seen = []

    def broken(*event):
        raise RuntimeError("handler bug")

    leave = [telemetry.subscribe(broken, ["jobs.pruned"]), telemetry.subscribe(lambda *e: seen.append(e[0]))]
    try:
        telemetry.emit("jobs.pruned", {}, {})
    finally:
        for f in leave:
            f()
    assert seen == ["jobs.pruned"] and "handler bug" in caplog.text


def test_unknown_event_names_are_refused():
    with pytest.raises(ValueError, match="unknown telemetry event"):
        telemetry.subscribe(print, ["job.finished"])


@pytest.mark.parametrize("rate, expected", [
    ("100/m", (100, 60.0)), ("5/2s", (5, 2.0)), ("1/h", (1, 3600.0)), ((3, 0.5), (3, 0.5)), (None, None),
])
def test_rates_parse(rate, expected):
    assert parse_rate(rate) == expected


@pytest.mark.parametrize("rate", ["0/s", "-1/s", "10", "10/x", (0, 1), (5, 0), (5, -1), "ten/s", (True, 1)])
def test_bad_rates_are_typed_errors(rate):
    with pytest.raises(InvalidJobOption):
        parse_rate(rate)


def test_unknown_state_names_are_typed_errors():
    with pytest.raises(InvalidState, match="'finished'"):
        job_filter(states=["available", "finished"])
    assert job_filter(states="discarded")["states"] == ["discarded"]


class _Task:
    max_retries = 3


@pytest.mark.parametrize("options, error", [
    ({"max_attempts": 0}, InvalidJobOption), ({"max_attempts": 2.5}, InvalidJobOption),
    ({"meta": ["not", "a", "dict"]}, InvalidJobOption), ({"meta": {"x": object()}}, InvalidJobOption),
    ({"retry_backoff": -1}, InvalidJobOption), ({"retry_jitter": "yes"}, InvalidJobOption),
    ({"unique": {"period": -5}}, InvalidUnique),
])
def test_bad_job_options_are_typed_errors(options, error):
    with pytest.raises(error):
        job_headers(_Task(), "t", dict(options), "q", [], {})


def test_job_options_become_headers():
    options = {"max_attempts": 5, "meta": {"tenant": 7}, "retry_backoff": 2, "retry_jitter": False, "other": 1}
    headers = job_headers(_Task(), "t", options, "q", [1], {})
    assert headers == {"pgbroker_max_attempts": 5, "pgbroker_meta": {"tenant": 7},
                       "pgbroker_backoff": {"factor": 2.0, "max": 600.0, "jitter": False}}
    assert options == {"other": 1}  # pgbroker's options are taken out of the publish
    assert job_headers(_Task(), "t", {}, "q", [], {}) == {"pgbroker_max_attempts": 4}  # max_retries + 1
