"""``bench/load.py --journal``: which journals a run covers, and how runs on each are told
apart in the tables (no server is started here)."""

from __future__ import annotations

import pytest

from bench.load import parse_args, targets


def test_journal_defaults_to_the_spool_and_both_means_spool_then_jetstream() -> None:
    assert parse_args([]).journal_list == ["spool"]
    assert parse_args(["--journal", "jetstream"]).journal_list == ["jetstream"]
    assert parse_args(["--journal", "both"]).journal_list == ["spool", "jetstream"]
    assert parse_args(["--journal", "jetstream,spool"]).journal_list == ["spool", "jetstream"]


def test_an_unknown_journal_is_refused() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--journal", "kafka"])


def test_the_yardsticks_run_in_the_first_journal_pass_only() -> None:
    a = parse_args(["--journal", "both"])
    assert targets(a, "service", "bare", "raw") == ["service", "bare", "raw"]
    a.journal = "jetstream"
    assert targets(a, "service", "bare", "raw") == ["service"]
