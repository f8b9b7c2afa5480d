"""pgpilot: make Python applications fast on PostgreSQL.

Two faces share one core: the pooling proxy (``pgpilot proxy``) and the in-app toolkit:

- ``pgpilot.batch``: DataLoader-style batching and ready-made SQL batch functions;
- ``pgpilot.nplusone``: an N+1 and duplicate-query detector for SQLAlchemy, psycopg and asyncpg;
- ``pgpilot.explain``: an EXPLAIN analyzer and index advisor (``pgpilot explain``, ``advise``);
- ``pgpilot.cache``: a query-result cache on Redis or in-process, invalidated when writes commit;
- ``pgpilot.insight``: query fingerprints and the detection both faces share.
"""

__version__ = "0.1.0"
# The PgBouncer whose command line, console and settings the pooler follows; `pgpilot --version`,
# `pgpilot-pgbouncer -V` and the admin console's SHOW VERSION all print VERSION_LINE.
PGBOUNCER_COMPATIBLE = "1.23.1"
VERSION_LINE = f"pgpilot {__version__} (PgBouncer {PGBOUNCER_COMPATIBLE} compatible)"
