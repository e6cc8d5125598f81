"""kombu transport for ``pgbroker://`` URLs: messages are rows of a Postgres jobs table.

Features: direct, topic and fanout exchanges whose bindings live in the database
(a binding made by one process routes every other process's publishes: Celery's
remote control, replies and events work across hosts), queues that expire
(``x-expires``, ``x-message-ttl``), priorities 0-9 (higher first), ETA/countdown
and ``expires`` handled in the database, batched claims sized by the consumer's
prefetch, batched acknowledgements, LISTEN/NOTIFY wake-ups, consumer heartbeats
and rescue of the jobs of dead consumers. A revoke broadcast through Celery's
remote control also cancels the task's job in the database (durable revoke).

Connection string: ``pgbroker://user:password@host:port/dbname?sslmode=require&...``
(any libpq parameter; what is left out comes from the ``PG*`` environment).
Options: see :class:`pgbroker.config.Options`, set through kombu's
``transport_options`` / Celery's ``broker_transport_options``.

The glue is thin on purpose: storage is :class:`pgbroker.engine.JobEngine`.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from collections import deque
from time import monotonic

from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments

from .config import Options, conninfo_from_url, mask_url, validate_name
from .db import Database, Listener
from . import telemetry
from . import task as _task
from .engine import JobEngine, Outcome, engine_for, error_entry
from .enqueue import unbound
from .errors import CONNECTION_ERRORS
from .maintenance import maintainer_for
from .message import channel_name

logger = logging.getLogger(__name__)

#: While a claim is being delivered (each task run in the call by a solo pool), how
#: often (seconds) to look for remote control that should overtake the rest of it.
CONTROL_CHECK_AFTER = 0.02
#: NOTIFY payload of jobs published or snoozed for later: this prefix and the epoch
#: they are due at (see queries.sql, wake_inserted).
SCHEDULED = "scheduled "


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


class Routes:
    """A process's cache of exchange types and routing tables, shared by its connections.

    A table is re-read when it is older than ``routing_cache_ttl`` seconds, so a
    publish reaches a queue deleted by another process at most that long after;
    a lookup that matches nothing always re-reads it, so a binding made elsewhere
    (a reply queue, a new monitor) is seen by the very next publish.
    """

    def __init__(self, engine: JobEngine, ttl: float):
        self.engine = engine
        self.ttl = ttl
        self._tables: dict[str, tuple[float, list]] = {}
        self._types: dict[str, tuple[float, str | None]] = {}

    def table(self, exchange: str, fresh: bool = False) -> list[tuple[str, str, str]]:
        cached = self._tables.get(exchange)
        if fresh or cached is None or monotonic() - cached[0] > self.ttl:
            cached = self._tables[exchange] = (monotonic(), self.engine.bindings(exchange))
        return cached[1]

    def lookup(self, kind, exchange: str, routing_key: str) -> list[str]:
        """The queues ``kind`` (a kombu exchange type) routes ``routing_key`` to; a miss
        on a cached table is checked against the database (bound since we read it?)."""
        entry = self._tables.get(exchange)
        reused = entry is not None and monotonic() - entry[0] <= self.ttl
        queues = kind.lookup(self.table(exchange), exchange, routing_key, None)
        if not queues and reused:
            queues = kind.lookup(self.table(exchange, fresh=True), exchange, routing_key, None)
        return list(queues or [])

    def exchange_type(self, exchange: str) -> str | None:
        cached = self._types.get(exchange)
        if cached is None or monotonic() - cached[0] > self.ttl:
            cached = self._types[exchange] = (monotonic(), self.engine.exchange_type(exchange))
        return cached[1]

    def forget(self, exchange: str | None = None) -> None:
        """Drop cached tables (one exchange's, or all after a queue was deleted)."""
        if exchange is None:
            self._tables.clear()
            self._types.clear()
        else:
            self._tables.pop(exchange, None)
            self._types.pop(exchange, None)


_routes_lock = threading.Lock()


def routes_for(engine: JobEngine) -> Routes:
    """The process-wide :class:`Routes` of an engine's database."""
    with _routes_lock:
        routes = getattr(engine, "_routes", None)
        if routes is None:
            routes = engine._routes = Routes(engine, engine.db.options.routing_cache_ttl)
        return routes


def revoked_task_ids(channel: "Channel", message: dict) -> tuple[list[str], bool]:
    """(task ids, terminate) of a remote-control ``revoke`` or ``terminate`` broadcast to
    every worker, else ([], False). A revoke for named workers (``destination``) is
    theirs alone: other workers may still run the task, so its job is not cancelled."""
    try:  # bytes this process serialised a moment ago (Celery's task_serializer): trusted
        payload = channel.Message(message, channel=channel, accept=[message.get("content-type")]).decode()
    except Exception as exc:
        logger.warning("pgbroker: could not read a remote-control message: %r", exc)
        return [], False
    method = payload.get("method") if isinstance(payload, dict) else None
    if method not in ("revoke", "terminate") or payload.get("destination"):
        return [], False
    arguments = payload.get("arguments") or {}
    ids = arguments.get("task_id")
    ids = [ids] if isinstance(ids, str) else [str(i) for i in (ids or [])]
    return ids, method == "terminate" or bool(arguments.get("terminate"))


class Channel(virtual.Channel):
    """One kombu channel; every storage hook is one JobEngine call."""

    Message = Message
    #: Bindings are stored in the database (see :class:`Routes`): fanout works across processes.
    supports_fanout = True

    #: Set by :mod:`pgbroker.worker` in Celery workers: task outcomes are then reported
    #: by the worker, and an ack only records that the delivery was acknowledged.
    task_outcomes_from_worker = False

    def __init__(self, connection, **kwargs):
        super().__init__(connection, **kwargs)
        self.engine = connection.engine
        self._no_ack_queues: set[str] = set()
        #: No-ack messages taken (deleted) and not delivered yet: job id -> the row as it was.
        self._taken: dict[int, dict] = {}
        #: The LISTEN channels of the queues this channel consumes.
        self.notify_channels: set[str] = set()
        self._blocked = False  # the last drain found no prefetch room

    # -- publishing ----------------------------------------------------------------------------

    def _put(self, queue, message, **kwargs):
        self.engine.enqueue(queue, message)

    def basic_publish(self, message, exchange, routing_key, **kwargs):
        """Publish; a direct/topic publish matching several queues stores its copies at once."""
        if not exchange or self.typeof(exchange).type == "fanout":
            return super().basic_publish(message, exchange, routing_key, **kwargs)
        self._inplace_augment_message(message, exchange, routing_key)
        queues = self._lookup(exchange, routing_key)
        if len(queues) == 1:
            self._put(queues[0], message)
        elif queues:
            self.engine.enqueue_copies(queues, message)

    def _put_fanout(self, exchange, message, routing_key, **kwargs):
        if not exchange.endswith(".pidbox"):  # joins the caller's transaction in pgbroker.atomic()
            self.engine.enqueue_fanout(exchange, message)
            return
        # Celery's remote control: sent at once, whatever becomes of a caller's transaction
        task_ids, terminate = revoked_task_ids(self, message)
        try:
            if task_ids:
                self._cancel(task_ids, terminate)
        finally:  # the workers are told even when the durable part failed
            with unbound():
                self.engine.enqueue_fanout(exchange, message)

    def _cancel(self, task_ids: list[str], terminate: bool) -> None:
        """Durable revoke: the jobs that have not started are cancelled for good (and
        marked REVOKED when pgbroker on this database is the result backend)."""
        by = f"celery remote control revoke{' (terminate)' if terminate else ''} from " \
             f"{socket.gethostname()} pid {os.getpid()}"
        from .backend import mark_revoked  # Celery's, imported only when Celery revokes

        mark_revoked(self.engine.db, self.engine.cancel(task_ids, by, running=terminate))

    # -- routing (bindings in the database) --------------------------------------------------------

    @property
    def routes(self) -> Routes:
        return routes_for(self.engine)

    def exchange_declare(self, exchange=None, type="direct", durable=False, auto_delete=False,
                         arguments=None, nowait=False, passive=False):
        if exchange:
            validate_name("exchange", exchange)
            if passive and exchange not in self.state.exchanges:
                stored = self.routes.exchange_type(exchange)
                if stored is not None:
                    type, passive = stored, False
        super().exchange_declare(exchange, type, durable, auto_delete, arguments, nowait, passive)
        if exchange:  # every time, as a queue (see _new_queue): it may have been deleted elsewhere
            self.engine.declare_exchange(exchange, type or "direct")

    def exchange_delete(self, exchange, if_unused=False, nowait=False):
        self.engine.delete_exchange(exchange)
        self.state.exchanges.pop(exchange, None)
        self.routes.forget(exchange)

    def typeof(self, exchange, default="direct"):
        if exchange in self.state.exchanges:
            return super().typeof(exchange, default)
        return self.exchange_types.get(self.routes.exchange_type(exchange) or default, self.exchange_types[default])

    def get_table(self, exchange):
        return self.routes.table(exchange)

    def _lookup(self, exchange, routing_key, default=None):
        default = default if default is not None else self.deadletter_queue
        if not exchange:
            return [routing_key or default]
        queues = self.routes.lookup(self.typeof(exchange), exchange, routing_key)
        if not queues and default is not None:
            self._new_queue(default)
            queues = [default]
        return queues

    def queue_bind(self, queue, exchange=None, routing_key="", arguments=None, **kwargs):
        """Store the binding in the database (every time: it may have expired meanwhile)."""
        exchange = exchange or "amq.direct"
        validate_name("queue", queue)
        self.state.binding_declare(queue, exchange, routing_key, arguments)
        routing_key, pattern, _ = self.typeof(exchange).prepare_bind(queue, exchange, routing_key, arguments)
        self._queue_bind(exchange, routing_key, pattern, queue)

    def _queue_bind(self, exchange, routing_key, pattern, queue):
        self.engine.bind(exchange, routing_key, pattern, queue)
        self.routes.forget(exchange)

    def queue_unbind(self, queue, exchange=None, routing_key="", arguments=None, **kwargs):
        exchange = exchange or "amq.direct"
        self.state.binding_delete(queue, exchange, routing_key)
        routing_key, _, _ = self.typeof(exchange).prepare_bind(queue, exchange, routing_key, arguments)
        self.engine.unbind(exchange, routing_key, queue)
        self.routes.forget(exchange)

    def queue_delete(self, queue, if_unused=False, if_empty=False, **kwargs):
        """Delete the queue, its messages and its bindings, whoever declared them."""
        if if_empty and self._size(queue):
            return
        self._delete(queue)
        self.state.queue_bindings_delete(queue)

    def _new_queue(self, queue, **kwargs):
        validate_name("queue", queue)
        # Every time (kombu's maybe_declare already declares once per connection): a
        # declare recreates a queue deleted elsewhere and renews its x-expires lease.
        # exclusive: kombu's Queue makes it auto_delete too; pgbroker has no per-connection
        # ownership, so it is an auto-delete queue here.
        self.engine.declare_queue(queue, kwargs.get("arguments") or {},
                                  auto_delete=bool(kwargs.get("auto_delete") or kwargs.get("exclusive")))

    def prepare_queue_arguments(self, arguments, **kwargs):
        """Queue(expires=, message_ttl=, …) as AMQP arguments (x-expires, x-message-ttl)."""
        return to_rabbitmq_queue_arguments(arguments, **kwargs)

    def _has_queue(self, queue, **kwargs):
        return self.engine.queue_exists(queue)

    def _size(self, queue):
        return self.engine.queue_size(queue)

    def _purge(self, queue):
        return self.engine.purge(queue)

    def _delete(self, queue, *args, **kwargs):
        self.engine.delete_queue(queue)
        self.routes.forget()  # its bindings went with it

    # -- consuming -----------------------------------------------------------------------------

    def basic_consume(self, queue, no_ack, callback, consumer_tag, **kwargs):
        validate_name("queue", queue)
        self.connection.owner()  # registered before the first claim
        if no_ack:
            self._no_ack_queues.add(queue)
        notify = channel_name(self.engine.schema, queue)
        self.connection.listener.listen([notify])
        self.connection.listener.fds()  # LISTEN now, before the first claim: nothing is missed
        self.notify_channels.add(notify)
        result = super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        self.connection.consuming(queue, True)
        self.connection.mark_due(self)  # what the queue already holds was never notified to us
        return result

    def basic_cancel(self, consumer_tag):
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        if queue is not None and queue not in self._active_queues:
            self.connection.give_back(self, queue)
            self._no_ack_queues.discard(queue)
            notify = channel_name(self.engine.schema, queue)
            self.notify_channels.discard(notify)
            self.connection.listener.unlisten([notify])
            self.connection.consuming(queue, False)
        return result

    def _claim(self, queues, limit):
        """Claim for acknowledging consumers; take (delete on delivery) for no-ack ones."""
        taking = [q for q in queues if q in self._no_ack_queues]
        claiming = [q for q in queues if q not in self._no_ack_queues]
        deliveries = []
        for payload, queue, original in self.engine.take(taking, limit) if taking else ():
            self._taken[_job_id(payload)] = original  # until delivered (see give_back)
            deliveries.append((payload, queue))
        if claiming and len(deliveries) < limit:
            deliveries += self.engine.claim(claiming, limit - len(deliveries), self.connection.owner())
        return deliveries

    def basic_get(self, queue, no_ack=False, **kwargs):
        validate_name("queue", queue)
        found = self.engine.take([queue], 1) if no_ack else self.engine.claim([queue], 1, self.connection.owner())
        if not found:
            return None
        message = self.Message(found[0][0], channel=self)
        if not no_ack:
            self.qos.append(message, message.delivery_tag)
        return message

    def claim_ready(self) -> list[tuple[dict, str]]:
        """Claim as many jobs as the prefetch window allows, in one statement.

        Tells the connection whether another claim may find more at once: only when
        this one filled the window's room (otherwise the queues were drained, and the
        next NOTIFY for one of them, freed prefetch room or the polling timeout says when
        to look again).
        """
        if not self._consumers:
            return []
        self._blocked = True  # set first: an ack from another thread from now on wakes us
        if not self.qos.can_consume():
            return []
        self._blocked = False
        limit = self.qos.can_consume_max_estimate() or self.engine.db.options.batch_size
        deliveries = self._claim(self._active_queues, limit)
        if len(deliveries) >= limit:
            self.connection.mark_due(self)
        return deliveries

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
        if op == "discarded" and telemetry.enabled("job.discarded"):
            headers = message.headers or {}
            telemetry.emit("job.discarded", {}, telemetry.job_metadata(
                job_id, headers.get("id"), headers.get("task"), headers.get("pgbroker_queue"), attempt, reason=error))
        if self._blocked:  # prefetch room was freed for a consumer that had none
            self.connection.wake()

    def _restore(self, message):
        """Give an unacknowledged delivery back to its queue (same row, marked redelivered)."""
        job_id, attempt = message.delivery_info["pgbroker_job"]
        self.engine.requeue(job_id, attempt)
        self.connection.wake()


def _job_id(payload: dict) -> int:
    return payload["properties"]["delivery_info"]["pgbroker_job"][0]


class Transport(virtual.Transport):
    """The ``pgbroker://`` kombu transport."""

    Channel = Channel

    def _deliver(self, message, queue):
        if message["headers"].get("pgbroker_unrevoke"):  # a job retried after its task was revoked
            from .worker import forget_revoke  # Celery's worker state, only when it comes to that

            forget_revoke(message["headers"].get("id"))
        super()._deliver(message, queue)

    default_port = 5432
    driver_type = "postgresql"
    driver_name = "psycopg"
    #: We parse the URL ourselves: every libpq parameter passes through.
    can_parse_url = True
    polling_interval = Options.polling_interval

    implements = virtual.Transport.implements.extend(
        asynchronous=False,
        exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False,
    )
    connection_errors = virtual.Transport.connection_errors + CONNECTION_ERRORS
    channel_errors = virtual.Transport.channel_errors
    #: Declared, so that kombu's ensure() (publish retries, Celery's too) keeps retrying
    #: a lost database up to its max_retries instead of giving up after one reconnect:
    #: reconnecting a pgbroker Connection does not prove the database is back.
    recoverable_connection_errors = connection_errors
    recoverable_channel_errors = ()

    def __init__(self, client, **kwargs):
        self.options = Options.from_mapping(client.transport_options)
        # kombu and Celery read it too (as a number: a string given in the settings
        # would break Celery's mingle); ours is validated and coerced.
        client.transport_options["polling_interval"] = self.options.polling_interval
        _task.install()  # apply_async(unique=..., max_attempts=..., meta=...) and task options
        super().__init__(client, **kwargs)
        self.database = Database.get(conninfo_from_url(client.hostname), self.options)
        self.engine = engine_for(self.database)
        self._listener: Listener | None = None
        self._owner: str | None = None
        self._consumed: set[str] = set()
        self._waiting = False
        self._interrupted = False
        #: Claimed and not yet delivered: (channel, message, queue), in delivery order.
        self._ready: deque[tuple[Channel, dict, str]] = deque()
        #: Whether every channel should claim now, or which ones (see drain_events).
        self.claim_due = True
        self._due: set[Channel] = set()
        #: Set when the worker consuming through this connection shuts down.
        self._stopping = False

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
            self._consumed = set()

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

    def interrupt(self) -> None:
        """Make :meth:`drain_events` return soon (``socket.timeout``) so that the caller's
        loop runs what another thread scheduled for it (called from any thread)."""
        self._interrupted = True
        self.wake()

    def stop_consuming(self) -> None:
        """The worker consuming through this connection is shutting down: from now on
        :meth:`drain_events` claims nothing and returns at once (what it claimed and did
        not deliver goes back to the queue when the consumer is cancelled). Safe in a
        signal handler: it sets flags and writes to a pipe."""
        self._stopping = True
        self.interrupt()

    def consuming(self, queue: str, on: bool) -> None:
        """Tell the process's Maintainer which queues this connection consumes (they
        do not expire while a live process consumes them)."""
        if on and queue not in self._consumed:
            self._consumed.add(queue)
            maintainer_for(self.engine).consume(self.owner(), [queue])
        elif not on and queue in self._consumed:
            self._consumed.discard(queue)
            maintainer_for(self.engine).cancel(self.owner(), [queue])

    # -- consuming -----------------------------------------------------------------------------

    def drain_events(self, connection, timeout=None):
        """Deliver one message: claimed now in a batch (the rest delivered by the next
        calls, without a query), else after blocking on LISTEN (never busy-poll).

        Wakes on a NOTIFY for a consumed queue, on an ack that frees prefetch room,
        or after ``polling_interval`` (the fallback for missed notifications), and
        claims only then or when the last claim filled its window: an idle worker
        does no query between deliveries. A claim is delivered in one call to
        acknowledging consumers, but one message per call to no-ack ones, as kombu's
        callers expect (pidbox counts calls to collect a given number of replies, event
        receivers to capture a given number of events).
        Raises ``socket.timeout`` after ``timeout`` seconds without a delivery.
        """
        deadline = None if timeout is None else monotonic() + timeout
        # Set before the first claim so that an ack landing between an empty claim and
        # the wait still interrupts the wait.
        self._waiting = True
        try:
            while True:
                if self._stopping:
                    raise socket.timeout()
                if self._ready:
                    self._deliver_ready()
                    return
                due = self._take_due()
                if due:
                    # Remote control first: a revoke must be read before the tasks it names.
                    due.sort(key=lambda c: not c._no_ack_queues)
                    for channel in due:  # a full claim marks its channel due again
                        self._ready.extend((channel, payload, queue) for payload, queue in channel.claim_ready())
                    if self._ready:
                        continue
                if self._interrupted:
                    self._interrupted = False
                    raise socket.timeout()
                wait = self.polling_interval
                if deadline is not None:
                    wait = min(wait, deadline - monotonic())
                    if wait <= 0:
                        raise socket.timeout()
                notified = self.listener.wait(wait)
                if notified:
                    self._mark_notified(notified)
                else:  # freed prefetch room or the polling timeout: every channel looks
                    self.claim_due = True
        finally:
            self._waiting = False

    def mark_due(self, channel: Channel) -> None:
        """``channel`` may find something to claim now."""
        self._due.add(channel)

    def _mark_notified(self, notified) -> None:
        """Channels notified of deliverable jobs claim next; a job scheduled for later
        (payload ``scheduled``) wakes the process's stager instead."""
        names = set()
        for n in notified:
            if n.payload.startswith(SCHEDULED):
                maintainer_for(self.engine).wake_at(float(n.payload[len(SCHEDULED):]))
            else:
                names.add(n.channel)
        for channel in self.channels:
            if not names.isdisjoint(channel.notify_channels):
                self._due.add(channel)

    def _take_due(self) -> list:
        """The channels to claim for now, in order; notifications that arrived meanwhile
        (while other channels kept claiming) count too, so no channel starves."""
        if self._due and not self.claim_due and self._listener is not None:
            self._mark_notified(self.listener.pending())
        if self.claim_due:
            due = list(self.channels)
        else:
            due = [c for c in self.channels if c in self._due]
        self.claim_due = False
        self._due.clear()
        return due

    def _deliver_ready(self) -> None:
        """Deliver the next claimed message; with it, the ones right behind it as long as
        they go to acknowledging consumers (a Celery worker's task queues: a whole claim in
        one call). A no-ack delivery (remote control, replies, events) is one call."""
        # A solo pool runs each task in this call: a shutdown meanwhile leaves the rest,
        # and remote control that arrived meanwhile (a revoke of a task further on) goes first.
        looked = monotonic()
        first = self._ready.popleft()
        if self._no_ack(first):
            first[0]._taken.pop(_job_id(first[1]), None)
            self._deliver(first[1], first[2])
            return
        self._deliver(first[1], first[2])
        while self._ready and not self._stopping and not self._no_ack(self._ready[0]):
            if monotonic() - looked > CONTROL_CHECK_AFTER:
                if self._claim_control_first():
                    return
                looked = monotonic()
            _, payload, queue = self._ready.popleft()
            self._deliver(payload, queue)

    def _claim_control_first(self) -> bool:
        """Claim the no-ack queues (remote control, replies) notified since the last look
        and put what they hold ahead of the claim being delivered; True when there was any."""
        notified = self.listener.pending()
        if not notified:
            return False
        self._mark_notified(notified)
        control = [c for c in self._due if c._no_ack_queues]
        self._due.difference_update(control)
        found = [(c, payload, queue) for c in control for payload, queue in c.claim_ready()]
        self._ready.extendleft(reversed(found))
        return bool(found)

    @staticmethod
    def _no_ack(item: tuple) -> bool:
        channel, _, queue = item
        return queue in channel._no_ack_queues

    def give_back(self, channel: Channel, queue: str | None = None) -> None:
        """Requeue what ``channel`` claimed (for ``queue``) but :meth:`drain_events` has
        not delivered yet: its consumer is going away. No-ack messages, which a claim
        deletes, are put back as they were."""
        keep: deque = deque()
        taken: list[dict] = []
        for item in self._ready:
            ch, payload, q = item
            if ch is not channel or (queue is not None and q != queue):
                keep.append(item)
            elif self._no_ack(item):
                taken.append(channel._taken.pop(_job_id(payload)))
            else:
                try:
                    self.engine.requeue(*payload["properties"]["delivery_info"]["pgbroker_job"])
                except Exception as exc:  # the rescuer takes them back when this connection is gone
                    logger.warning("pgbroker: could not give back a claimed message: %s", exc)
        self._ready = keep
        if taken:
            try:
                self.engine.restore(taken)
            except Exception as exc:
                logger.warning("pgbroker: %d no-ack message(s) taken but not delivered are lost: %s",
                               len(taken), exc)
