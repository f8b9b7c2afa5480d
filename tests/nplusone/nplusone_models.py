"""The SQLAlchemy models the N+1 detector tests run against (customers -> orders -> items).

Tables live in a schema of their own, named after the process, so that suites running at the
same time against the same database never see each other's rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from sqlalchemy import Engine, ForeignKey, String, Text
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SCHEMA = f"pgp_nplusone_{os.getpid()}"
CUSTOMERS = 6
ORDERS_PER_CUSTOMER = 3
ITEMS_PER_ORDER = 2


class Base(AsyncAttrs, DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012 - SQLAlchemy reads it as is

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    orders: Mapped[list[Order]] = relationship(back_populates="customer", order_by="Order.id")


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey(f"{SCHEMA}.customers.id"))
    total: Mapped[int]
    customer: Mapped[Customer] = relationship(back_populates="orders")
    items: Mapped[list[Item]] = relationship(back_populates="order", order_by="Item.id")


class Item(Base):
    __tablename__ = "items"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey(f"{SCHEMA}.orders.id"))
    sku: Mapped[str] = mapped_column(String(20))
    order: Mapped[Order] = relationship(back_populates="items")


class Account(Base):
    """A wide row (eight columns, one of them text): what overfetch, existence loads and
    read-modify-write are tried on."""

    __tablename__ = "accounts"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012
    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey(f"{SCHEMA}.customers.id"))
    owner: Mapped[str] = mapped_column(String(50))
    email: Mapped[str] = mapped_column(String(100))
    balance: Mapped[int]
    currency: Mapped[str] = mapped_column(String(3))
    notes: Mapped[str] = mapped_column(Text)
    created: Mapped[str] = mapped_column(String(30))
    customer: Mapped[Customer] = relationship()


ACCOUNTS = 6


@dataclass(frozen=True)
class Database:
    """Where the seeded tables are, in the forms the tests connect with."""

    schema: str
    sqlalchemy_url: str
    async_sqlalchemy_url: str
    dsn: str
    engine: Engine
