"""Replicate, behind the `Provider` protocol: the adapter on the real `replicate` client (`replicate`),
its shared rate budgets (`ratelimit`), the fetching of its output files (`downloads`), and the lean
HTTP/1.1 transport under both (`transport`); and fal.ai behind the same protocol, on the official
`fal-client`'s queue API (`fal`), and the check of its ED25519-signed webhooks (`fal_webhooks`); not yet
chosen by any route.

May import `mediagen.core.errors`, `mediagen.metrics` and `mediagen.settings`; knows no table and no job.
"""
