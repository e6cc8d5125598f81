"""kombu transport for ``pgbroker://`` URLs: messages are rows of a Postgres jobs table.

Features: direct and topic exchanges (bindings per process, as kombu's virtual
transports keep them), priorities 0-9 (higher first), ETA/countdown and
``expires`` handled in the database, batched claims sized by the consumer's
prefetch, batched acknowledgements, LISTEN/NOTIFY wake-ups, consumer heartbeats
and rescue of the jobs of dead consumers.

Connection string: ``pgbroker://user:password@host:port/dbname?sslmode=require&...``
(any libpq parameter; what is left out comes from the ``PG*`` environment).
Options: see :class:`pgbroker.config.Options`, set through kombu's
``transport_options`` / Celery's ``broker_transport_options``.

The glue is thin on purpose: storage is :class:`pgbroker.engine.JobEngine`.
"""
from __future__ import annotations

import socket
from queue import Empty
from time import monotonic

from kombu.transport import virtual

from .config import Options, conninfo_from_url, mask_url, validate_name
from .db import Database, Listener
from .engine import Outcome, engine_for, error_entry
from .errors import CONNECTION_ERRORS
from .maintenance import maintainer_for
from .message import channel_name


class Message(virtual.Message):
    """A delivered message that remembers why it could not be decoded."""

    #: Set when the body could not be decoded; the job is then discarded with it.
    pgbroker_error: str | None = None

    def _decode(self):
        try:
            return super()._decode()
        except Exception as exc:
            self.pgbroker_error = f"undecodable message body ({self.content_type}): {exc!r}"
            raise


class Channel(virtual.Channel):
    """One kombu channel; every storage hook is one JobEngine call."""

    Message = Message

    #: Set by :mod:`pgbroker.worker` in Celery workers: task outcomes are then reported
    #: by the worker, and an ack only records that the delivery was acknowledged.
    task_outcomes_from_worker = False

    def __init__(self, connection, **kwargs):
        super().__init__(connection, **kwargs)
        self.engine = connection.engine
        self._no_ack_queues: set[str] = set()
        self._blocked = False  # the last drain found no prefetch room

    # -- publishing ----------------------------------------------------------------------------

    def _put(self, queue, message, **kwargs):
        self.engine.enqueue(queue, message)

    def _new_queue(self, queue, **kwargs):
        validate_name("queue", queue)
        self.connection.declare_queue_once(queue, kwargs)

    def _has_queue(self, queue, **kwargs):
        return self.engine.queue_exists(queue)

    def _size(self, queue):
        return self.engine.queue_size(queue)

    def _purge(self, queue):
        return self.engine.purge(queue)

    def _delete(self, queue, *args, **kwargs):
        self.connection.forget_queue(queue)
        self.engine.delete_queue(queue)

    def exchange_declare(self, exchange=None, type="direct", *args, **kwargs):
        if exchange:
            validate_name("exchange", exchange)
        return super().exchange_declare(exchange, type, *args, **kwargs)

    # -- consuming -----------------------------------------------------------------------------

    def basic_consume(self, queue, no_ack, callback, consumer_tag, **kwargs):
        validate_name("queue", queue)
        self.connection.owner()  # registered before the first claim
        if no_ack:
            self._no_ack_queues.add(queue)
        self.connection.listener.listen([channel_name(self.engine.schema, queue)])
        result = super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        self.connection.claim_due = True  # what the queue already holds was never notified to us
        return result

    def basic_cancel(self, consumer_tag):
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        if queue is not None and queue not in self._active_queues:
            self._no_ack_queues.discard(queue)
            self.connection.listener.unlisten([channel_name(self.engine.schema, queue)])
        return result

    def _claim(self, queues, limit):
        deliveries = self.engine.claim(queues, limit, self.connection.owner())
        for payload, queue in deliveries:
            if queue in self._no_ack_queues:  # nobody will ack: settle at delivery
                job_id, attempt = payload["properties"]["delivery_info"]["pgbroker_job"]
                self.engine.settler.submit(Outcome(job_id, attempt, "completed"))
        return deliveries

    def basic_get(self, queue, no_ack=False, **kwargs):
        message = super().basic_get(queue, no_ack, **kwargs)
        if message is not None and no_ack:  # nobody will ack it
            self._settle(message, "completed")
        return message

    def _get(self, queue, timeout=None):
        deliveries = self._claim([queue], 1)
        if not deliveries:
            raise Empty()
        return deliveries[0][0]

    def drain_events(self, timeout=None, callback=None):
        """Claim as many jobs as the prefetch window allows, in one statement, and deliver them.

        Tells the connection whether another claim may find more at once: only when
        this one filled the window's room (otherwise the queues were drained, and the
        next NOTIFY, freed prefetch room or polling timeout says when to look again).
        """
        if not self._consumers:
            raise Empty()
        self._blocked = True  # set first: an ack from another thread from now on wakes us
        if not self.qos.can_consume():
            raise Empty()
        self._blocked = False
        limit = self.qos.can_consume_max_estimate() or self.engine.db.options.batch_size
        deliveries = self._claim(self._active_queues, limit)
        if len(deliveries) >= limit:
            self.connection.claim_due = True
        if not deliveries:
            raise Empty()
        deliver = callback or self.connection._deliver
        for payload, queue in deliveries:
            deliver(payload, queue)

    # -- acknowledgements ----------------------------------------------------------------------

    def basic_ack(self, delivery_tag, multiple=False):
        message = self.qos._delivered.get(delivery_tag)
        super().basic_ack(delivery_tag, multiple)
        if message is not None:
            self._settle(message, self._ack_op(message), message.pgbroker_error)

    def basic_reject(self, delivery_tag, requeue=False):
        message = self.qos._delivered.get(delivery_tag)
        super().basic_reject(delivery_tag, requeue=requeue)  # requeue -> _restore
        if message is not None and not requeue:
            reason = message.pgbroker_error or "rejected by the consumer without requeue"
            self._settle(message, "discarded", reason)

    def _ack_op(self, message) -> str:
        if message.pgbroker_error:
            return "discarded"
        headers = message.headers or {}
        if self.task_outcomes_from_worker and "task" in headers and "id" in headers:
            return "acked"
        return "completed"

    def _settle(self, message, op, error=None):
        job_id, attempt = message.delivery_info["pgbroker_job"]
        entry = error_entry(attempt, error) if error else None
        self.engine.settler.submit(Outcome(job_id, attempt, op, entry))
        if self._blocked:  # prefetch room was freed for a consumer that had none
            self.connection.wake()

    def _restore(self, message):
        """Give an unacknowledged delivery back to its queue (same row, marked redelivered)."""
        job_id, attempt = message.delivery_info["pgbroker_job"]
        self.engine.requeue(job_id, attempt)
        self.connection.wake()


class Transport(virtual.Transport):
    """The ``pgbroker://`` kombu transport."""

    Channel = Channel

    default_port = 5432
    driver_type = "postgresql"
    driver_name = "psycopg"
    #: We parse the URL ourselves: every libpq parameter passes through.
    can_parse_url = True
    polling_interval = Options.polling_interval

    implements = virtual.Transport.implements.extend(
        asynchronous=False,
        exchange_type=frozenset(["direct", "topic"]),
        heartbeats=False,
    )
    connection_errors = virtual.Transport.connection_errors + CONNECTION_ERRORS
    channel_errors = virtual.Transport.channel_errors

    def __init__(self, client, **kwargs):
        self.options = Options.from_mapping(client.transport_options)
        client.transport_options.setdefault("polling_interval", self.options.polling_interval)
        super().__init__(client, **kwargs)
        self.database = Database.get(conninfo_from_url(client.hostname), self.options)
        self.engine = engine_for(self.database)
        self._listener: Listener | None = None
        self._owner: str | None = None
        self._declared: set[str] = set()
        self._waiting = False
        #: Whether a claim may find something now (see drain_events).
        self.claim_due = True

    def as_uri(self, uri: str, include_password=False, mask="**") -> str:
        return uri if include_password else mask_url(uri, mask)

    def driver_version(self):
        import psycopg

        return psycopg.__version__

    # -- connection life -----------------------------------------------------------------------

    def establish_connection(self):
        self.database.ensure_ready()
        return super().establish_connection()

    def close_connection(self, connection):
        super().close_connection(connection)  # closes channels: unacked deliveries are restored
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._owner is not None:
            maintainer_for(self.engine).close_connection(self._owner)
            self._owner = None

    @property
    def listener(self) -> Listener:
        if self._listener is None:
            self._listener = self.database.listener()
        return self._listener

    def owner(self) -> str:
        """The id this connection's claims carry (registered with the process's Maintainer)."""
        if self._owner is None:
            self._owner = maintainer_for(self.engine).open_connection()
        return self._owner

    def wake(self) -> None:
        """Interrupt :meth:`drain_events` if it is waiting (called from any thread)."""
        if self._waiting and self._listener is not None:
            self._listener.wake()

    def declare_queue_once(self, queue: str, arguments: dict) -> None:
        if queue not in self._declared:
            self.engine.declare_queue(queue, arguments)
            self._declared.add(queue)

    def forget_queue(self, queue: str) -> None:
        self._declared.discard(queue)

    # -- consuming -----------------------------------------------------------------------------

    def drain_events(self, connection, timeout=None):
        """Deliver what can be claimed now, else block on LISTEN (never busy-poll).

        Wakes on a NOTIFY for a consumed queue, on an ack that frees prefetch room,
        or after ``polling_interval`` (the fallback for missed notifications), and
        claims only then or when the last claim filled its window: an idle worker
        does no query between deliveries.
        Raises ``socket.timeout`` after ``timeout`` seconds without a delivery.
        """
        deadline = None if timeout is None else monotonic() + timeout
        # Set before the first claim so that an ack landing between an empty claim and
        # the wait still interrupts the wait.
        self._waiting = True
        try:
            while True:
                if self.claim_due:
                    self.claim_due = False  # a full claim sets it again
                    channels = list(self.channels)
                    for i, channel in enumerate(channels):
                        try:
                            channel.drain_events()
                        except Empty:
                            continue
                        if i < len(channels) - 1:  # the channels after it have not looked yet
                            self.claim_due = True
                        return
                wait = self.polling_interval
                if deadline is not None:
                    wait = min(wait, deadline - monotonic())
                    if wait <= 0:
                        raise socket.timeout()
                self.listener.wait(wait)
                self.claim_due = True  # a notification, freed prefetch room or the polling timeout
        finally:
            self._waiting = False
