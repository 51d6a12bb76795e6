"""The model catalog: each allowed model's own input schema (shipped snapshots, refreshed from
Replicate), validation of a job's parameters against it, and the exact `input` sent to Replicate.
It knows no HTTP route, table, broker or adapter: the API hands it a fetch function and Redis.
"""
