"""The HTTP API: the app factory, thin routes, request and response schemas, auth, and the HTTP plumbing.

May import `mediagen.core`, `mediagen.storage`, and the shared modules at the top of the package
(settings, logging, metrics, broker, services). Nothing in the worker imports from here.
"""
