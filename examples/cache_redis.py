"""pgpilot.cache on Redis: a request writes an order and reads the customer's orders back, in
the same request and the next one, never stale; 200 concurrent callers fill a hot key once.

python examples/cache_redis.py postgresql://postgres@127.0.0.1:5432/test [redis://127.0.0.1:6379/15]
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from decimal import Decimal

from sqlalchemy import ForeignKey, create_engine, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pgpilot.cache import Cache, RedisBackend

SCHEMA = f"cache_example_{uuid.uuid4().hex[:8]}"  # runs at the same time do not collide


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012
    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey(f"{SCHEMA}.customers.id"))
    total: Mapped[Decimal]


def orders_of(session: Session, cache: Cache, customer_id: int) -> list[Decimal]:
    stmt = select(Order).where(Order.customer_id == customer_id).order_by(Order.id)
    return [o.total for o in session.scalars(stmt.options(cache.from_cache(ttl=600)))]


def main(dsn: str, redis_url: str) -> None:
    engine = create_engine(dsn.replace("postgresql://", "postgresql+psycopg://", 1))
    cache = Cache(RedisBackend(redis_url), namespace=SCHEMA, default_ttl=600)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {SCHEMA}"))
    Base.metadata.create_all(engine)
    try:
        with Session(engine) as session:
            session.add(Customer(id=1, name="Ada"))
            session.add_all([Order(customer_id=1, total=Decimal(t)) for t in ("10.00", "20.00")])
            session.commit()

        with Session(engine) as session:  # request 1: reads, then the same read is a hit
            first = orders_of(session, cache, 1)
            again = orders_of(session, cache, 1)
        print("orders before the write:", len(first), "(second read from the cache:",
              again == first, ")")

        with Session(engine) as session:  # request 2: writes an order, reads the list back
            session.add(Order(customer_id=1, total=Decimal("30.00")))
            session.flush()
            inside = orders_of(session, cache, 1)
            session.commit()
            after = orders_of(session, cache, 1)
        with Session(engine) as session:  # request 3
            next_request = orders_of(session, cache, 1)
        print("orders read in the writing transaction:", len(inside))
        print("orders read after its commit:", len(after))
        print("orders read by the next request:", len(next_request))

        calls: list[int] = []

        @cache.cached(ttl=600, tags=["table:customers"])
        async def customer_name(customer_id: int) -> str:
            calls.append(customer_id)
            await asyncio.sleep(0.05)  # a slow query
            return "Ada"

        async def stampede() -> list[str]:
            return await asyncio.gather(*(customer_name(1) for _ in range(200)))

        names = asyncio.run(stampede())
        print("concurrent callers:", len(names))
        print("fills executed:", len(calls))
        stats = cache.stats()["sql"]
        print(f"statement cache: hits={stats.hits} misses={stats.misses} "
              f"bypasses={stats.bypasses}")
    finally:
        cache.clear()
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {SCHEMA} CASCADE"))
        engine.dispose()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "redis://127.0.0.1:6379/15")
