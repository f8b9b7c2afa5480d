"""pgpilot: make Python applications fast on PostgreSQL.

Two faces share one core: the pooling proxy (``pgpilot proxy``) and the in-app toolkit:

- ``pgpilot.batch``: DataLoader-style batching and ready-made SQL batch functions;
- ``pgpilot.nplusone``: an N+1 and duplicate-query detector for SQLAlchemy, psycopg and asyncpg;
- ``pgpilot.explain``: an EXPLAIN analyzer and index advisor (``pgpilot explain``, ``advise``);
- ``pgpilot.cache``: a query-result cache on Redis or in-process, invalidated when writes commit;
- ``pgpilot.insight``: query fingerprints and the detection both faces share.
"""

__version__ = "0.1.0"
