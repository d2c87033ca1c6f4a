"""Checks of the prequential metrics, the offline replay, and the evaluate and report commands."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drnn_core import prequential
from drnn_core.errors import ConfigError
from drnn_core.kernels import RANK_NOT_EVALUATED, RANK_UNKNOWN_ITEM
from streamer.datasets import Basket, Interaction, read_baskets, synthetic_interactions
from streamer.evaluate import (
    EvaluationError,
    add_evaluate_command,
    encode_baskets,
    encode_stream,
    replay_basket_model,
    replay_model,
    run_basket_evaluation,
    run_evaluation,
)
from streamer.report import ReportError, add_report_command, require_matplotlib
from streamer.settings import Settings, load_settings

SMALL_MODEL = dict(hidden_size=8, window=3, batch_size=50)
SYSTEM_NAMES = ("model", "pop", "markov1")
SYSTEM_KEYS = {
    "name", "settings", "hr_at_10", "mrr_at_10", "ndcg_at_10",
    "hr_at_10_second_half", "mrr_at_10_second_half", "ndcg_at_10_second_half", "events_per_second",
}

# Hand-made ranks: hits at 0, 1, 9 and 3; rank 10 is a hit only at K=20; -1 is a new item (a miss).
HAND_RANKS = np.array([0, 1, 9, 10, RANK_UNKNOWN_ITEM, 3], dtype=np.int64)


# Metrics.


def test_cutoff_metrics_hand_ranks():
    metrics = prequential.cutoff_metrics(HAND_RANKS, 10)

    assert metrics.events == 6
    assert metrics.hits == 4
    assert metrics.hr == pytest.approx(4 / 6)
    assert metrics.mrr == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 4) / 6)
    assert metrics.ndcg == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11) + 1 / math.log2(5)) / 6)


def test_cutoff_metrics_cutoff_20_includes_rank_10():
    metrics = prequential.cutoff_metrics(HAND_RANKS, 20)

    assert metrics.hits == 5
    assert metrics.reciprocal_rank_sum == pytest.approx(1 + 1 / 2 + 1 / 10 + 1 / 11 + 1 / 4)


def test_cutoff_metrics_no_events_is_zero():
    metrics = prequential.cutoff_metrics(np.zeros(0, dtype=np.int64), 10)

    assert (metrics.hr, metrics.mrr, metrics.ndcg) == (0.0, 0.0, 0.0)


def test_cutoff_metrics_rejects_zero_cutoff():
    with pytest.raises(ConfigError, match="cutoff"):
        prequential.cutoff_metrics(HAND_RANKS, 0)


def test_second_half_odd_length_keeps_middle():
    assert prequential.second_half(np.arange(5)).tolist() == [2, 3, 4]


def test_summarize_second_half_hand_ranks():
    summary = prequential.summarize(HAND_RANKS)

    assert summary["events"] == 6
    assert summary["second_half_events"] == 3
    assert summary["hits_at_10_second_half"] == 1
    assert summary["hr_at_10_second_half"] == pytest.approx(1 / 3)
    assert summary["mrr_at_10_second_half"] == pytest.approx(1 / 4 / 3)
    assert summary["hr_at_20_second_half"] == pytest.approx(2 / 3)


def test_summarize_rejects_float_ranks():
    with pytest.raises(ConfigError, match="integer"):
        prequential.summarize(np.array([0.0, 1.0]))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-1, 40), min_size=1, max_size=200))
def test_summarize_metric_order_invariant(ranks):
    summary = prequential.summarize(np.array(ranks, dtype=np.int64))

    assert summary["hr_at_10"] >= summary["ndcg_at_10"] - 1e-12
    assert summary["ndcg_at_10"] >= summary["mrr_at_10"] - 1e-12
    assert summary["hr_at_20"] >= summary["hr_at_10"]


def test_sliding_mean_hand_values():
    ends, means = prequential.sliding_mean(np.array([1, 0, 1, 1]), 2)

    assert ends.tolist() == [1, 2, 3]
    assert means.tolist() == [0.5, 0.5, 1.0]


def test_sliding_mean_rejects_window_longer_than_values():
    with pytest.raises(ConfigError, match="window"):
        prequential.sliding_mean(np.ones(3), 4)


def test_downsample_keeps_last_point():
    ends, means = prequential.sliding_mean(np.ones(10_000), 10)

    kept_ends, kept_means = prequential.downsample(ends, means, 500)

    assert len(kept_ends) <= 500
    assert kept_ends[-1] == ends[-1]
    assert kept_ends[0] == ends[0]
    assert len(kept_means) == len(kept_ends)


def test_learning_curve_mrr_values():
    ends, values = prequential.learning_curve(HAND_RANKS, "mrr", 10, window=3)

    assert ends.tolist() == [2, 3, 4, 5]
    assert values[0] == pytest.approx((1 + 1 / 2 + 1 / 10) / 3)
    assert values[-1] == pytest.approx(1 / 4 / 3)


def test_learning_curve_rejects_unknown_metric():
    with pytest.raises(ConfigError, match="metric"):
        prequential.learning_curve(HAND_RANKS, "auc", 10, window=3)


@pytest.mark.parametrize("events, window", [(1, 1), (50, 50), (500, 100), (20_000, 2000), (800_000, 5000)])
def test_default_window_sizes(events, window):
    assert prequential.default_window(events) == window


# The offline replay.


def _settings(**overrides) -> Settings:
    return load_settings(environ={}, **{**SMALL_MODEL, **overrides})


def test_encode_stream_first_appearance_order():
    interactions = [Interaction("b", "y", 1.0), Interaction("a", "x", 2.0), Interaction("b", "x", 3.0)]

    stream = encode_stream(interactions)

    assert stream.users.tolist() == [0, 1, 0]
    assert stream.items.tolist() == [0, 1, 1]
    assert (stream.user_count, stream.item_count) == (2, 2)


def test_replay_model_batch_size_invariant():
    stream = encode_stream(synthetic_interactions(users=20, items=40, events=700, seed=2))

    small = replay_model(stream, _settings(batch_size=7))
    large = replay_model(stream, _settings(batch_size=1000))

    assert small.ranks.tolist() == large.ranks.tolist()
    assert np.array_equal(small.model.V, large.model.V)


def test_replay_model_ranks_every_event():
    interactions = synthetic_interactions(users=10, items=30, events=300, seed=3)
    stream = encode_stream(interactions)

    run = replay_model(stream, _settings())

    first_of_item = {}
    for position, interaction in enumerate(interactions):
        first_of_item.setdefault(interaction.item_id, position)
    assert np.all(run.ranks >= RANK_UNKNOWN_ITEM)
    assert sorted(np.flatnonzero(run.ranks == RANK_UNKNOWN_ITEM).tolist()) == sorted(first_of_item.values())


def test_run_evaluation_rejects_empty_stream():
    with pytest.raises(EvaluationError, match="no interactions"):
        run_evaluation(encode_stream([]), _settings(), dataset="empty.tsv")


def test_run_evaluation_markov1_beats_pop_on_chains():
    stream = encode_stream(synthetic_interactions(users=30, items=60, events=3000, seed=4))

    result = run_evaluation(stream, _settings(), dataset="synthetic")

    markov = prequential.summarize(result.system("markov1").ranks)
    pop = prequential.summarize(result.system("pop").ranks)
    assert markov["hr_at_10_second_half"] > pop["hr_at_10_second_half"]


# The evaluate and report commands.


def _parser() -> argparse.ArgumentParser:
    """Build a drnn-stream parser with only the evaluate and report commands, as streamer.cli wires them."""
    parser = argparse.ArgumentParser(prog="drnn-stream")
    commands = parser.add_subparsers(dest="command", required=True)
    add_evaluate_command(commands)
    add_report_command(commands)
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.run(load_settings(args, environ={}), args)


def _table(out: str) -> tuple[list[str], list[list[str]]]:
    """Return the header cells and the three system rows of the table that ``evaluate`` printed."""
    lines = out.splitlines()
    header = next(index for index, line in enumerate(lines) if line.startswith("system"))
    return lines[header].split(), [line.split() for line in lines[header + 1 : header + 4]]


def _write_sessions(path, interactions) -> None:
    lines = ["SessionId\tItemId\tTime"] + [f"{i.user_id}\t{i.item_id}\t{i.ts}" for i in interactions]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def sessions_file(tmp_path):
    path = tmp_path / "clicks.tsv"
    _write_sessions(path, synthetic_interactions(users=15, items=40, events=1200, seed=6))
    return path


def test_evaluate_command_prints_table(sessions_file, capsys):
    status = _run(["evaluate", "--dataset", str(sessions_file), "--format", "sessions", "--no-progress",
                   "--hidden-size", "8", "--window", "3"])

    out = capsys.readouterr().out
    header, rows = _table(out)
    assert status == 0
    assert f"dataset: {sessions_file}" in out
    assert "events: 1,200" in out
    assert "hidden_size=8" in out
    assert header[1:5] == ["HR@10", "MRR@10", "NDCG@10", "HR@20"]
    assert [row[0] for row in rows] == list(SYSTEM_NAMES)
    assert all(len(row) == 10 for row in rows)


def test_evaluate_command_writes_json(sessions_file, tmp_path):
    summary_path = tmp_path / "summary.json"

    _run(["evaluate", "--dataset", str(sessions_file), "--format", "sessions", "--no-progress",
          "--hidden-size", "8", "--seed", "3", "--json", str(summary_path)])

    summary = json.loads(summary_path.read_text())
    systems = {system["name"]: system for system in summary["systems"]}
    assert summary["dataset"] == str(sessions_file)
    assert summary["events"] == 1200
    assert list(systems) == list(SYSTEM_NAMES)
    for name in SYSTEM_NAMES:
        assert SYSTEM_KEYS <= systems[name].keys(), name
    assert systems["model"]["settings"]["seed"] == 3
    assert systems["model"]["settings"]["hidden_size"] == 8
    assert systems["pop"]["settings"] == {}


def test_evaluate_command_json_curves(sessions_file, tmp_path):
    summary_path = tmp_path / "summary.json"

    _run(["evaluate", "--dataset", str(sessions_file), "--format", "sessions", "--no-progress",
          "--hidden-size", "8", "--json", str(summary_path)])

    curves = json.loads(summary_path.read_text())["curves"]
    assert curves["window"] == prequential.default_window(1200)
    assert curves["event"][-1] == 1200
    assert len(curves["event"]) <= prequential.MAX_CURVE_POINTS
    for metric in ("hr_at_10", "mrr_at_10"):
        assert set(curves[metric]) == set(SYSTEM_NAMES), metric
        assert all(len(values) == len(curves["event"]) for values in curves[metric].values()), metric


def test_evaluate_command_limit(sessions_file, tmp_path):
    summary_path = tmp_path / "summary.json"

    _run(["evaluate", "--dataset", str(sessions_file), "--format", "sessions", "--no-progress",
          "--hidden-size", "8", "--limit", "300", "--json", str(summary_path)])

    summary = json.loads(summary_path.read_text())
    assert summary["events"] == 300
    assert summary["systems"][0]["second_half_events"] == 150


def test_evaluate_command_rejects_zero_limit(sessions_file, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["evaluate", "--dataset", str(sessions_file), "--format", "sessions", "--limit", "0"])

    assert "positive integer" in capsys.readouterr().err


def test_evaluate_command_rejects_jsonl_format(sessions_file, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["evaluate", "--dataset", str(sessions_file), "--format", "jsonl"])

    assert "invalid choice" in capsys.readouterr().err


def test_evaluate_command_draws_plot(sessions_file, tmp_path):
    pytest.importorskip("matplotlib")
    plot_path = tmp_path / "hr.png"

    _run(["evaluate", "--dataset", str(sessions_file), "--format", "sessions", "--no-progress",
          "--hidden-size", "8", "--plot", str(plot_path)])

    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_command_without_matplotlib_names_extra(sessions_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)

    with pytest.raises(ReportError, match=r"drnn-stream\[plot\]"):
        _run(["evaluate", "--dataset", str(sessions_file), "--format", "sessions", "--no-progress",
              "--plot", str(tmp_path / "hr.png")])

    assert not (tmp_path / "hr.png").exists()


def test_require_matplotlib_missing_names_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)

    with pytest.raises(ReportError, match=r"pip install 'drnn-stream\[plot\]'"):
        require_matplotlib()


def test_report_command_writes_curves(sessions_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    summary_path = tmp_path / "summary.json"
    _run(["evaluate", "--dataset", str(sessions_file), "--format", "sessions", "--no-progress",
          "--hidden-size", "8", "--json", str(summary_path)])
    capsys.readouterr()

    status = _run(["report", str(summary_path), "--out", str(tmp_path / "plots")])

    printed = capsys.readouterr().out.split()
    assert status == 0
    assert printed == [str(tmp_path / "plots" / "hr_at_10.png"), str(tmp_path / "plots" / "mrr_at_10.png")]
    for path in printed:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n", path


def test_report_command_rejects_summary_without_curves(tmp_path):
    pytest.importorskip("matplotlib")
    summary_path = tmp_path / "summary.json"
    summary_path.write_text(json.dumps({"dataset": "x", "events": 1, "systems": []}))

    with pytest.raises(ReportError, match="no 'curves' section"):
        _run(["report", str(summary_path), "--out", str(tmp_path / "plots")])


def test_report_command_missing_summary_names_path(tmp_path):
    pytest.importorskip("matplotlib")
    missing = tmp_path / "missing.json"

    with pytest.raises(ReportError, match="not found"):
        _run(["report", str(missing), "--out", str(tmp_path / "plots")])


def test_evaluate_settings_cover_model_config():
    from streamer.evaluate import MODEL_SETTINGS

    config_fields = {field.name for field in dataclasses.fields(Settings().model_config())} - {"initial_items"}

    assert config_fields <= set(MODEL_SETTINGS)



# Basket mode.

TAFENG_HEADER = (
    '"TRANSACTION_DT","CUSTOMER_ID","AGE_GROUP","PIN_CODE","PRODUCT_SUBCLASS",'
    '"PRODUCT_ID","AMOUNT","ASSET","SALES_PRICE"'
)


def _basket_rows(seed: int, users: int = 12, days: int = 20, items: int = 30) -> list[str]:
    """Return Ta-Feng rows where each user buys 1 to 4 items on some days, with a taste per user."""
    rng = np.random.default_rng(seed)
    rows = []
    for day in range(days):
        date = datetime.date(2001, 1, 1) + datetime.timedelta(days=day)
        for user in range(users):
            if rng.random() < 0.5:
                continue
            taste = [(user * 3 + k) % items for k in range(5)]
            for item in rng.choice(taste, size=rng.integers(1, 5), replace=True):
                rows.append(f'"{date.month}/{date.day}/{date.year}","c{user:03d}","45-49","115","1","p{item}","1","1","1"')
    return rows


@pytest.fixture
def baskets_file(tmp_path):
    path = tmp_path / "tafeng.csv"
    path.write_text(TAFENG_HEADER + "\n" + "\n".join(_basket_rows(8)) + "\n")
    return path


def test_encode_baskets_offsets_and_first_appearance():
    baskets = [Basket("b", 1.0, ("y", "x")), Basket("a", 1.0, ("x",)), Basket("b", 2.0, ("z", "y"))]

    stream = encode_baskets(baskets)

    assert stream.users.tolist() == [0, 1, 0]
    assert stream.offsets.tolist() == [0, 2, 3, 5]
    assert stream.items.tolist() == [0, 1, 1, 2, 0]
    assert (stream.user_count, stream.item_count, stream.events) == (2, 3, 3)


def test_replay_basket_model_ranks_users_with_history():
    baskets = [Basket(f"u{e % 4}", float(e), (f"i{e % 5}", f"i{(e + 2) % 7}")) for e in range(40)]
    stream = encode_baskets(baskets)

    run = replay_basket_model(stream, _settings(), "mean")

    first_baskets = [0, 1, 2, 3]
    assert np.all(run.ranks[first_baskets] == RANK_NOT_EVALUATED)
    assert np.all(run.ranks[4:] >= 0)
    assert run.evaluated_ranks.shape[0] == 36


def test_replay_basket_model_batch_size_invariant():
    baskets = [Basket(f"u{e % 5}", float(e), (f"i{e % 6}", f"i{(e * 7) % 11}")) for e in range(80)]
    stream = encode_baskets(baskets)

    small = replay_basket_model(stream, _settings(batch_size=9), "max")
    large = replay_basket_model(stream, _settings(batch_size=1000), "max")

    assert small.ranks.tolist() == large.ranks.tolist()
    assert np.array_equal(small.model.V, large.model.V)


def test_run_basket_evaluation_rejects_single_baskets():
    stream = encode_baskets([Basket("a", 1.0, ("x",)), Basket("b", 1.0, ("x",))])

    with pytest.raises(EvaluationError, match="no user has two"):
        run_basket_evaluation(stream, _settings(), dataset="tiny.csv")


def test_run_basket_evaluation_names_limit():
    stream = encode_baskets([Basket("a", 1.0, ("x",))])

    with pytest.raises(EvaluationError, match="--limit 1") as error:
        run_basket_evaluation(stream, _settings(), dataset="tiny.csv", limit=1)

    assert "The first 1 basket of tiny.csv" in str(error.value)


def test_evaluate_command_limit_without_history(baskets_file):
    with pytest.raises(EvaluationError, match="--limit 1"):
        _run(["evaluate", "--dataset", str(baskets_file), "--format", "tafeng-baskets", "--no-progress", "--limit", "1"])


def test_evaluate_command_rejects_pooling_without_baskets(sessions_file):
    with pytest.raises(EvaluationError, match="--basket-pooling") as error:
        _run(["evaluate", "--dataset", str(sessions_file), "--format", "sessions", "--no-progress",
              "--basket-pooling", "max"])

    assert "--format tafeng-baskets" in str(error.value)


def test_evaluate_command_pooling_default_mean(baskets_file, tmp_path):
    summary_path = tmp_path / "summary.json"

    _run(["evaluate", "--dataset", str(baskets_file), "--format", "tafeng-baskets", "--no-progress",
          "--hidden-size", "8", "--json", str(summary_path)])

    systems = {system["name"]: system for system in json.loads(summary_path.read_text())["systems"]}
    assert systems["model"]["settings"]["basket_pooling"] == "mean"


def test_evaluate_command_basket_mode_table(baskets_file, capsys):
    status = _run(["evaluate", "--dataset", str(baskets_file), "--format", "tafeng-baskets", "--no-progress",
                   "--hidden-size", "8", "--window", "3"])

    out = capsys.readouterr().out
    _, rows = _table(out)
    assert status == 0
    assert "mode: basket" in out
    assert "basket_pooling=mean" in out
    assert [row[0] for row in rows] == list(SYSTEM_NAMES)
    assert all(len(row) == 10 for row in rows)


def test_evaluate_command_basket_mode_json(baskets_file, tmp_path):
    summary_path = tmp_path / "summary.json"

    _run(["evaluate", "--dataset", str(baskets_file), "--format", "tafeng-baskets", "--no-progress",
          "--hidden-size", "8", "--basket-pooling", "max", "--json", str(summary_path)])

    summary = json.loads(summary_path.read_text())
    systems = {system["name"]: system for system in summary["systems"]}
    assert summary["mode"] == "basket"
    assert summary["evaluated_events"] == summary["events"] - summary["users"]
    assert systems["model"]["settings"]["basket_pooling"] == "max"
    for name in SYSTEM_NAMES:
        assert systems[name]["events"] == summary["evaluated_events"], name
        assert SYSTEM_KEYS <= systems[name].keys(), name
    assert summary["curves"]["event"][-1] == summary["evaluated_events"]


def test_run_basket_evaluation_learns_user_tastes(tmp_path):
    path = tmp_path / "tafeng.csv"
    path.write_text(TAFENG_HEADER + "\n" + "\n".join(_basket_rows(9, users=12, days=150)) + "\n")
    stream = encode_baskets(read_baskets(path))

    result = run_basket_evaluation(stream, _settings(), dataset=str(path))

    model = prequential.summarize(result.system("model").evaluated_ranks)
    pop = prequential.summarize(result.system("pop").evaluated_ranks)
    markov = prequential.summarize(result.system("markov1").evaluated_ranks)
    assert markov["hr_at_10_second_half"] > pop["hr_at_10_second_half"]
    assert model["mrr_at_10_second_half"] > pop["mrr_at_10_second_half"]


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_replay_basket_model_singletons_match_item_mode(pooling):
    interactions = synthetic_interactions(users=20, items=40, events=1500, seed=2)
    one_item_baskets = [Basket(i.user_id, i.ts, (i.item_id,)) for i in interactions]

    item_run = replay_model(encode_stream(interactions), _settings())
    basket_run = replay_basket_model(encode_baskets(one_item_baskets), _settings(), pooling)

    # The two updates add the same terms in different orders, so the weights differ by float32 rounding.
    ranked = basket_run.ranks != RANK_NOT_EVALUATED
    assert int(np.count_nonzero(~ranked)) == 20
    assert basket_run.ranks[ranked].tolist() == item_run.ranks[ranked].tolist()
    np.testing.assert_allclose(basket_run.model.V, item_run.model.V, atol=1e-4)

