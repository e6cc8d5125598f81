"""No database: options, URLs, names, message conversion."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pgbroker.config import Options, conninfo_from_url, mask_url, validate_name, validate_schema
from pgbroker.errors import ConfigurationError, InvalidMessage, InvalidName, MessageTooLarge
from pgbroker.message import channel_name, from_row, priority_of, to_row


def test_urls_become_libpq_uris_with_parameters():
    assert conninfo_from_url("pgbroker://u:p@db:5433/shop?sslmode=require&application_name=w") == (
        "postgresql://u:p@db:5433/shop?sslmode=require&application_name=w"
    )
    assert conninfo_from_url("pgbroker+postgresql://u@h/db") == "postgresql://u@h/db"
    assert conninfo_from_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert conninfo_from_url("pgbroker://") == "postgresql://"  # PG* environment
    with pytest.raises(ConfigurationError):
        conninfo_from_url("redis://h/0")


def test_passwords_are_masked():
    assert mask_url("pgbroker://u:s3cret@h/db") == "pgbroker://u:**@h/db"
    assert "s3cret" not in mask_url("postgresql://u@h/db?password=s3cret&sslmode=require")
    # a / ? or # left unencoded in the password ends the URL's host part early
    assert mask_url("pgbroker://u:s3/cret@h:5432/db") == "pgbroker://u:**@h:5432/db"
    assert mask_url("pgbroker://u:s3#cret@h/db") == "pgbroker://u:**@h/db"
    assert mask_url("pgbroker://u:s3?cret@h/db?password=x") == "pgbroker://u:**@h/db?password=**"
    ordinary = "pgbroker://h:5432/db?application_name=a@b"
    assert mask_url(ordinary) == ordinary


@pytest.mark.parametrize("url", ["pgbroker://u:s3/cret@h/db", "pgbroker://u:s3#cret@h/db", "pgbroker://u:s3?c@h/db",
                                 "pgbroker://u:s3@cret@h/db", "pgbroker://u:s3%zzcret@h/db", "pgbroker://u:s3cret%@h/db"])
def test_a_password_with_unencoded_url_characters_is_refused_without_showing_it(url):
    with pytest.raises(ConfigurationError, match="must be percent-encoded") as info:
        conninfo_from_url(url)
    assert "s3" not in str(info.value) and "cret" not in str(info.value)
    assert conninfo_from_url("pgbroker://u:s3%2Fcret@h/db") == "postgresql://u:s3%2Fcret@h/db"


def test_a_url_libpq_cannot_parse_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="cannot parse .*invalid percent-encoded token"):
        conninfo_from_url("pgbroker://u:pw@h/d%zzb")


def test_options_validate_early():
    assert Options.from_mapping({"prefix": "tenant_a"}).schema == "tenant_a"
    assert Options.from_mapping({"polling_interval": "0.25", "visibility_timeout": 3}).polling_interval == 0.25
    for bad in ({"schema": 'x"; drop table jobs; --'}, {"polling_interval": 0}, {"rescue_after": 1},
                {"max_message_size": 0}, {"synchronous_commit": "maybe"}, {"batch_size": "many"}):
        with pytest.raises(ConfigurationError):
            Options.from_mapping(bad)


@pytest.mark.parametrize("bad", [
    {"heartbeat_interval": "nan"}, {"polling_interval": float("nan")}, {"routing_cache_ttl": "inf"},
    {"auto_migrate": "flase"}, {"rescue_batch_size": 2.9}, {"rescue_interval": "never"},
])
def test_options_refuse_values_that_would_silently_mean_something_else(bad):
    with pytest.raises(ConfigurationError, match=next(iter(bad))):
        Options.from_mapping(bad)


def test_options_read_the_spellings_postgres_and_settings_files_use():
    o = Options.from_mapping({"synchronous_commit": "OFF", "auto_migrate": "no", "rescue_batch_size": 3.0,
                              "prune_completed_after": "never", "polling_interval": "2"})
    assert (o.synchronous_commit, o.auto_migrate, o.rescue_batch_size, o.prune_completed_after,
            o.polling_interval) == ("off", False, 3, None, 2.0)


def test_names():
    for name in ["celery", "q'uote", "semi;colon", "drop table x; --", "é🚀队列", "x" * 200]:
        assert validate_name("queue", name) == name
    for bad in ["", "nul\x00byte", "x" * 2000, None]:
        with pytest.raises(InvalidName):
            validate_name("queue", bad)
    with pytest.raises(InvalidName):
        validate_schema("Public")


def test_channel_names_fit_postgres_identifiers():
    for queue in ["celery", "x" * 500, "é🚀"]:
        name = channel_name("pgbroker", queue)
        assert len(name.encode()) <= 63 and name.isascii()
    assert channel_name("a", "q") != channel_name("b", "q")


def message(**headers):
    return {"body": "e30=", "headers": headers, "properties": {"priority": 3, "delivery_info": {}},
            "content-type": "application/json", "content-encoding": "utf-8"}


def test_row_lifts_celery_headers():
    row = to_row("q", message(id="t1", task="app.add", eta="2030-01-01T00:00:00+00:00",
                              expires="2030-01-02T00:00:00", retries=1), 1000)
    assert (row.task_id, row.task, row.priority, row.retry) == ("t1", "app.add", 3, True)
    assert row.scheduled_at.year == 2030 and row.expires_at.tzinfo is not None
    plain = to_row("q", message(), 1000)
    assert plain.task_id is None and plain.scheduled_at is None


def test_bad_messages_are_refused():
    with pytest.raises(MessageTooLarge) as err:
        to_row("q", {**message(), "body": "x" * 101}, 100)
    assert err.value.size == 101 and "max_message_size" in str(err.value)
    with pytest.raises(InvalidMessage):
        to_row("q", message(eta="next tuesday"), 1000)
    with pytest.raises(InvalidName):
        to_row("bad\x00queue", message(), 1000)


def test_unencodable_headers_are_refused_but_stray_properties_dropped(caplog):
    with pytest.raises(InvalidMessage, match="headers are not serialisable"):
        to_row("q", message(x=object()), 1000)
    # kombu passes a publish call's extra keyword arguments as properties; AMQP ignores them
    msg = message()
    msg["properties"]["signal"] = object()
    row = to_row("q", msg, 1000)
    assert '"signal"' not in row.properties and row.priority == 3
    assert "['signal'] cannot be encoded" in caplog.text


def test_priorities_are_clamped():
    assert [priority_of({"priority": p}) for p in (None, -3, 0, 5, 9, 42, "x")] == [0, 0, 0, 5, 9, 9, 0]


def test_from_row_adds_the_delivery_identity():
    row = {"id": 7, "attempt": 2, "queue": "q", "redelivered": True, "headers": '{"id": "t"}',
           "properties": '{"delivery_info": {"exchange": "celery"}}', "body": "e30=",
           "content_type": "application/json", "content_encoding": "utf-8"}
    payload = from_row(row)
    assert payload["properties"]["delivery_tag"] == "7.2"
    assert payload["properties"]["delivery_info"] == {"exchange": "celery", "redelivered": True,
                                                      "pgbroker_job": [7, 2]}
    assert payload["headers"]["pgbroker_job"] == [7, 2] and payload["headers"]["pgbroker_queue"] == "q"


def test_url_scheme_resolves_without_importing_pgbroker():
    """A fresh interpreter: kombu knows pgbroker:// through the installed .pth hook alone."""
    code = ("import sys, kombu.transport as t; "
            "print(t.TRANSPORT_ALIASES['pgbroker'], 'pgbroker' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.stdout.split() == ["pgbroker.transport:Transport", "False"], out.stderr
