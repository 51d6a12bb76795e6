"""The domain: the job's state machine (`jobs`), the retry policy (`retry`), the error tree (`errors`),
the tables (`models`) and database access (`db`).

Knows no HTTP and no Dramatiq: imports nothing from `mediagen` but `settings` and `logging`.
"""
