"""Replicate, behind the `Provider` protocol: the adapter on the real `replicate` client (`replicate`)
and the lean HTTP/1.1 transport under it and under image downloads (`transport`).

May import `mediagen.core.errors`, `mediagen.metrics` and `mediagen.settings`; knows no table and no job.
"""
