"""The N+1 detector on a SQLAlchemy 2 model: a lazy relationship in a loop, found and fixed.

``Author.posts`` is an ordinary lazy relationship. Listing 20 authors with their post counts
loads the authors in one query, then each author's posts in a query of its own the first time
``author.posts`` is read: 21 queries. Inside ``pgpilot.nplusone.detect()`` that loop is
reported with the relationship, the line that ran it and the fix, ``selectinload(Author.posts)``.
The script then runs the fixed query: 2 queries, and the detector reports nothing.

    python examples/nplusone_sqlalchemy.py [DSN]

DSN: default ``$PGPILOT_DSN``, else postgresql://postgres@127.0.0.1:5432/test. The tables live
in a schema of their own, dropped at the end. In a test suite, ``pytest --nplusone=raise`` fails
every test whose body runs such a loop.
"""

from __future__ import annotations

import os
import sys
import uuid

from sqlalchemy import ForeignKey, create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
)

from pgpilot.nplusone import Report, detect

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
AUTHORS = 20
POSTS = 5


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "authors"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    posts: Mapped[list[Post]] = relationship(back_populates="author", order_by="Post.id")


class Post(Base):
    __tablename__ = "posts"

    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("authors.id"), index=True)
    title: Mapped[str]
    author: Mapped[Author] = relationship(back_populates="posts")


def post_counts(session: Session, *, eager: bool) -> dict[str, int]:
    """The page: every author with the number of their posts."""
    query = select(Author).order_by(Author.id)
    if eager:
        query = query.options(selectinload(Author.posts))
    return {author.name: len(author.posts) for author in session.scalars(query)}


def show(title: str, report: Report) -> None:
    print(f"{title}: {report.queries} queries, {len(report.findings)} finding(s)")
    for finding in report.findings:
        print(
            f"  {finding.kind}: {finding.count} executions of one statement "
            f"({finding.distinct_params} parameter sets) at {finding.callsite}"
        )
        print(f"    relationship: {finding.relationship}")
        print(f"    statement:    {' '.join(finding.sql.split())[:100]}")
        print(f"    fix:          {finding.suggestion}")


def main(dsn: str) -> None:
    schema = f"pgpilot_example_nplusone_{uuid.uuid4().hex[:8]}"
    url = make_url(dsn).set(drivername="postgresql+psycopg")
    admin = create_engine(url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    # Every connection of the application's engine works in the example's schema.
    engine = create_engine(url, connect_args={"options": f"-c search_path={schema}"})
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as session:
            session.add_all(
                Author(
                    id=a,
                    name=f"author {a}",
                    posts=[Post(id=a * 100 + p, title=f"post {p}") for p in range(POSTS)],
                )
                for a in range(1, AUTHORS + 1)
            )
            session.commit()

        with Session(engine) as session, detect() as lazy:
            slow = post_counts(session, eager=False)
        show("lazy loading", lazy)

        with Session(engine) as session, detect() as eager:
            fast = post_counts(session, eager=True)
        show("with selectinload(Author.posts)", eager)
        print(eager.summary())

        assert fast == slow == {f"author {a}": POSTS for a in range(1, AUTHORS + 1)}
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PGPILOT_DSN", DEFAULT_DSN))
