"""A fake fal.ai: an HTTP app that speaks fal's queue API closely enough for the unmodified `fal-client`,
renders real images for the four default models' fal endpoints, signs its webhooks with ED25519 (and
serves the JWKS to check them) and injects faults on demand.

`python -m fake_fal` runs it; `fake_fal.server.create_app` mounts it in tests. It stands in for
queue.fal.run and so imports nothing from `mediagen` (a test checks). Its manual is README.md beside this file.
"""
