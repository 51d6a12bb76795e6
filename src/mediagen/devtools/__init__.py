"""Zero-setup development: the `make run` launcher and the embedded PostgreSQL and Redis it starts.

Used by `make run`, the tests, the benchmark and the `mediagen` command; nothing the API or the worker
runs in production imports from here.
"""
