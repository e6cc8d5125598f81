"""Publishing inside an asyncio app's transaction: psycopg ``AsyncConnection`` and
SQLAlchemy ``AsyncSession``.

Each order is inserted and its ``charge`` job published in one transaction. An
optional gift wrap runs in a savepoint: when it fails, its own job goes with the
savepoint and the order (and its charge) still commit.

    DATABASE_URL=postgresql://user:pass@host/db python examples/orders_async.py
    DATABASE_URL=... celery -A orders_async worker -P threads    # from examples/: runs the charges

With psycopg each ``.delay()`` is written on your connection at once (so your own
queries see it); with SQLAlchemy the block writes its publishes when it exits.
"""
from __future__ import annotations

import asyncio
import os
import sys

import psycopg
from celery import Celery
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

import pgbroker

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://localhost/shop")
SCHEMA = os.environ.get("PGBROKER_SCHEMA", "pgbroker")
BROKER_URL = "pgbroker" + DATABASE_URL[len("postgresql"):]

celery = Celery("orders_async", broker=BROKER_URL, backend=BROKER_URL)
celery.conf.update(broker_transport_options={"schema": SCHEMA})


@celery.task
def charge(order_id: int) -> str:
    return f"charged order {order_id}"


@celery.task
def wrap(order_id: int) -> str:
    return f"wrapped order {order_id}"


class OutOfPaper(Exception):
    pass


async def wrap_in(savepoint, order_id: int, gift_wrap: bool, published: list, caller: str) -> None:
    """Publish the wrap job inside ``savepoint``; out of paper, the job goes with it."""
    try:
        async with savepoint:
            published.append(wrap.delay(order_id))
            if gift_wrap:
                raise OutOfPaper(order_id)
    except OutOfPaper:
        print(f"{caller}: no gift wrap for order {order_id}: its wrap job went with the savepoint")


async def order_with_psycopg(item: str, gift_wrap: bool) -> tuple[int, list]:
    async with await psycopg.AsyncConnection.connect(DATABASE_URL) as conn:
        async with conn.transaction(), pgbroker.atomic(conn):
            cur = await conn.execute("INSERT INTO example_async_orders (item) VALUES (%s) RETURNING id", [item])
            order_id = (await cur.fetchone())[0]
            published = [charge.delay(order_id)]
            await wrap_in(conn.transaction(), order_id, gift_wrap, published, "psycopg")  # a savepoint
        return order_id, published


async def order_with_sqlalchemy(item: str, gift_wrap: bool) -> tuple[int, list]:
    engine = create_async_engine(DATABASE_URL.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        async with AsyncSession(engine) as session, session.begin():
            async with pgbroker.atomic(session):
                order_id = (await session.execute(
                    text("INSERT INTO example_async_orders (item) VALUES (:item) RETURNING id"), {"item": item}
                )).scalar_one()
                published = [charge.delay(order_id)]
                await wrap_in(session.begin_nested(), order_id, gift_wrap, published, "sqlalchemy")
        return order_id, published
    finally:
        await engine.dispose()


async def main() -> int:
    async with await psycopg.AsyncConnection.connect(DATABASE_URL, autocommit=True) as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS example_async_orders (id serial PRIMARY KEY, item text)")
    orders = [await order_with_psycopg("tea", gift_wrap=True), await order_with_psycopg("cake", gift_wrap=False),
              await order_with_sqlalchemy("jam", gift_wrap=True)]
    async with await psycopg.AsyncConnection.connect(DATABASE_URL, autocommit=True) as conn:
        for order_id, published in orders:
            cur = await conn.execute(f'SELECT task FROM "{SCHEMA}".jobs WHERE task_id = ANY(%s) ORDER BY id',
                                     [[r.id for r in published]])
            print(f"order {order_id}: jobs {[row[0].rsplit('.', 1)[-1] for row in await cur.fetchall()]}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
