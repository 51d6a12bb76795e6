"""A fake Replicate: an HTTP app that speaks Replicate's predictions API closely enough for the unmodified
`replicate` client, renders real images and injects faults on demand.

`python -m fake_replicate` runs it; `fake_replicate.server.create_app` mounts it in tests. It stands in
for api.replicate.com and so imports nothing from `mediagen` (a test checks).
"""
