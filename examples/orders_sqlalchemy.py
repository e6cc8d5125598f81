"""A small SQLAlchemy web app whose orders and their payment job commit together.

``POST /orders?item=tea`` inserts an order and enqueues ``charge(order_id)`` in the
same transaction: the worker can never look for an order that does not exist (yet),
and an order whose request fails leaves neither the order nor the job behind
(``&fail=1`` makes the request fail after both were written).
``GET /orders/<id>`` shows the order, its job state and the task's result.

    DATABASE_URL=postgresql://user:pass@host/db python examples/orders_sqlalchemy.py serve
    DATABASE_URL=... celery -A orders_sqlalchemy worker     # from examples/

Standard library WSGI (wsgiref) so that the example needs nothing beyond
SQLAlchemy; the same two lines work in a Flask or FastAPI handler.
"""
from __future__ import annotations

import json
import os
import sys
from urllib.parse import parse_qs

from celery import Celery
from sqlalchemy import ForeignKey, String, create_engine, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import pgbroker

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://localhost/shop")
SCHEMA = os.environ.get("PGBROKER_SCHEMA", "pgbroker")
BROKER_URL = "pgbroker" + DATABASE_URL[len("postgresql"):]

engine = create_engine(DATABASE_URL.replace("postgresql://", "postgresql+psycopg://", 1))
celery = Celery("orders", broker=BROKER_URL, backend=BROKER_URL)
celery.conf.update(broker_transport_options={"schema": SCHEMA}, task_acks_late=True)


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "example_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    item: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(20), default="new")
    task_id: Mapped[str | None] = mapped_column(String(36))


class Payment(Base):
    __tablename__ = "example_payments"
    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("example_orders.id"))


@celery.task(bind=True, max_retries=3)
def charge(self, order_id: int) -> str:
    """Runs in the worker: the order is always there, because it committed with this job."""
    with Session(engine) as session, session.begin():
        order = session.get(Order, order_id)
        if order is None:  # cannot happen with pgbroker.atomic(); a broker outside the DB races here
            raise self.retry(countdown=1)
        order.status = "charged"
        session.add(Payment(order_id=order_id))
    return f"charged order {order_id}"


def place_order(item: str, fail: bool = False) -> dict:
    """The request handler's work: one transaction for the order and its job."""
    with Session(engine) as session, session.begin():
        order = Order(item=item)
        session.add(order)
        session.flush()  # the order has its id
        with pgbroker.atomic(session):
            result = charge.delay(order.id)  # written with the session's connection
        order.task_id = result.id
        if fail:
            raise RuntimeError(f"request failed after enqueueing {result.id}")
        return {"order": order.id, "task": result.id}
    # commit: the order and the job exist, the worker is woken;  exception: neither exists


def show_order(order_id: int) -> dict | None:
    with Session(engine) as session:
        order = session.get(Order, order_id)
        if order is None:
            return None
        job = session.execute(
            text(f'SELECT state, attempt FROM "{SCHEMA}".jobs WHERE task_id = :id'), {"id": order.task_id}
        ).mappings().first()
        result = charge.AsyncResult(order.task_id)
        return {"order": order.id, "item": order.item, "status": order.status,
                "job": dict(job) if job else None, "task_state": result.state,
                "result": result.result if result.successful() else None}


def application(environ, start_response):
    """The WSGI application."""
    method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
    query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    try:
        if method == "POST" and path == "/orders":
            status, body = "201 Created", place_order(query.get("item", "tea"), fail=query.get("fail") == "1")
        elif method == "GET" and path.startswith("/orders/") and path[8:].isdigit():
            body = show_order(int(path[8:]))
            status = "200 OK" if body else "404 Not Found"
        else:
            status, body = "404 Not Found", {"error": f"no route for {method} {path}"}
    except Exception as exc:  # the transaction has rolled back: no order, no job
        status, body = "500 Internal Server Error", {"error": str(exc)}
    start_response(status, [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]


def create_tables() -> None:
    Base.metadata.create_all(engine)


if __name__ == "__main__":
    create_tables()
    if sys.argv[1:] == ["serve"]:
        from wsgiref.simple_server import make_server

        port = int(os.environ.get("PORT", "8000"))
        print(f"serving on http://127.0.0.1:{port}  (POST /orders?item=tea, GET /orders/1)")
        make_server("127.0.0.1", port, application).serve_forever()
    else:
        placed = place_order("tea")
        print("placed", placed, "- start a worker to charge it, then GET /orders/<id>")
