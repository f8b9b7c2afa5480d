"""The pooler: an asyncio shell around :mod:`pgpilot.wire` (``pgpilot proxy``)."""
