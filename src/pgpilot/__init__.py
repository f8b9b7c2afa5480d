"""pgpilot: make Python applications fast on PostgreSQL.

Two faces share one core: the pooling proxy (``pgpilot proxy``) and the in-app toolkit
(``pgpilot.batch``, ``pgpilot.nplusone``, ``pgpilot.explain``, ``pgpilot.cache``, ``pgpilot.orm``).
"""

__version__ = "0.1.0"
