"""Zero-setup development: the `make run` launcher and its supervisor, the embedded PostgreSQL and Redis it
starts, and the watchdog that stops them when the launcher is gone.

Used by `make run`, the tests, the benchmark and the `mediagen` command; nothing the API or the worker
runs in production imports from here.
"""
