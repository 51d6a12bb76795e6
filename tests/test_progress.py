"""Progress is read from a prediction's logs the way the replicate client reads it."""

from __future__ import annotations

from mediagen.worker.progress import parse

# Real flux-schnell logs (shared/replicate-models.md, section 7): tqdm's updates as separate lines.
FLUX_LOGS = (
    "Using seed: 62182\nrunning quantized prediction\nUsing seed: 62182\n"
    "  0%|          | 0/4 [00:00<?, ?it/s]\n 75%|███████▌  | 3/4 [00:00<00:00, 15.38it/s]\n"
)


def test_the_last_bar_in_the_logs_is_the_progress() -> None:
    assert parse(FLUX_LOGS) == 0.75
    assert parse(FLUX_LOGS + "100%|██████████| 4/4 [00:00<00:00, 13.43it/s]\nTotal safe images: 1 out of 1\n") == 1.0


def test_logs_without_a_bar_have_no_progress() -> None:
    assert parse(None) is None
    assert parse("") is None
    assert parse("Using seed: 1\n4it [00:01, 3.10it/s]\n") is None  # tqdm without a total
