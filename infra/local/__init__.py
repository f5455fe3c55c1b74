"""Local development services: an S3-compatible server (moto), a Ray head, an HTTP file server.

The same functions start these for ``make demo``-style local runs (``python -m infra.local.s3 start``) and
for the test fixtures (``tests/conftest.py``), so tests exercise exactly what users run.
"""
