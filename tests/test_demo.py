"""Checks of the demo summary's text and JSON forms."""

from __future__ import annotations

import json

from streamer.demo import NO_EVENT_RANKED, DemoSummary


def make_summary(evaluated: int, sample_every: int, hr_at_10: float = 0.0, mrr_at_10: float = 0.0) -> DemoSummary:
    return DemoSummary(
        dataset="synthetic",
        events_read=100,
        trained=90,
        skipped=5,
        invalid=5,
        users=10,
        items=20,
        evaluated=evaluated,
        evaluation_sample_every=sample_every,
        hr_at_10=hr_at_10,
        mrr_at_10=mrr_at_10,
        events_per_second=1000.0,
        user_count_mismatches=0,
    )


def text_rows(summary: DemoSummary) -> dict[str, str]:
    return dict(line.split(None, 1) for line in summary.as_text().splitlines())


def test_summary_text_shows_sampling() -> None:
    rows = text_rows(make_summary(evaluated=9, sample_every=10, hr_at_10=0.25, mrr_at_10=0.125))
    assert rows["evaluated"] == "9"
    assert rows["evaluation_sample_every"] == "10"
    assert rows["hr_at_10"] == "0.2500"
    assert rows["mrr_at_10"] == "0.1250"


def test_summary_text_without_ranked_events() -> None:
    rows = text_rows(make_summary(evaluated=0, sample_every=1_000_000))
    assert rows["hr_at_10"] == NO_EVENT_RANKED
    assert rows["mrr_at_10"] == NO_EVENT_RANKED


def test_summary_text_with_evaluation_off() -> None:
    rows = text_rows(make_summary(evaluated=0, sample_every=0))
    assert rows["evaluation_sample_every"] == "0"
    assert rows["hr_at_10"] == NO_EVENT_RANKED


def test_summary_json_keeps_numeric_metrics() -> None:
    fields = json.loads(make_summary(evaluated=0, sample_every=0).as_json())
    assert fields["evaluated"] == 0
    assert fields["evaluation_sample_every"] == 0
    assert fields["hr_at_10"] == 0.0
    assert fields["mrr_at_10"] == 0.0
