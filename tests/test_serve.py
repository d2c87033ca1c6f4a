"""Tests of the recommendation service: parameter parsing, ranking, checkpoint reloading, HTTP and CLI.

The store tests use the session's real redis-server, the model runs the real
Numba kernels, and the HTTP tests run uvicorn on a loopback port.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

from drnn_core.model import RecurrentBPR
from drnn_core.state import UserStateBatch
from streamer.checkpoints import CheckpointStore
from streamer.datasets import synthetic_interactions
from streamer.embedded import free_port
from streamer.serve import (
    DEFAULT_K,
    DEFAULT_SERVE_ADDRESS,
    MAX_K,
    InvalidParameterError,
    ModelNotLoadedError,
    ModelWatcher,
    Recommender,
    add_recommend_command,
    add_serve_command,
    build_service,
    load_openapi,
    make_server,
    parse_address,
    parse_exclude_recent,
    parse_k,
    parse_user_id,
    popularity_order,
    rank_by_popularity,
    rank_by_scores,
    run_recommend,
)
from streamer.settings import Settings, load_settings
from streamer.store import RedisStore

HIDDEN_SIZE = 16
WINDOW = 3
TOPIC = "serve-test"
CLOSED_BROKER = "127.0.0.1:1"


# Data: a model trained on a synthetic stream, its user states in Redis and a checkpoint.


class Seeded:
    """A trained model, the states it produced and where they are stored."""

    def __init__(self, settings: Settings, store: RedisStore, model: RecurrentBPR, states: UserStateBatch,
                 user_ids: list[str]) -> None:
        self.settings = settings
        self.store = store
        self.model = model
        self.states = states
        self.user_ids = user_ids

    def row(self, user_id: str) -> int:
        return self.user_ids.index(user_id)

    def expected_top(self, user_id: str, k: int) -> list[str]:
        indexes, _ = self.model.top_k(self.states.hidden[self.row(user_id)], k)
        return self.store.item_ids_of(indexes.tolist())


def serve_settings(redis_url: str, key_prefix: str, checkpoint_dir: Path, bootstrap: str) -> Settings:
    return Settings(
        redis_url=redis_url, key_prefix=key_prefix, hidden_size=HIDDEN_SIZE, window=WINDOW,
        checkpoint_dir=str(checkpoint_dir), bootstrap_servers=bootstrap,
    )


def seed_model(settings: Settings, store: RedisStore, *, events: int = 1500, seed: int = 1) -> Seeded:
    """Train a model on a synthetic stream with the real kernels, store the states and write a checkpoint."""
    interactions = synthetic_interactions(users=25, items=60, events=events, seed=seed)
    user_ids = sorted({interaction.user_id for interaction in interactions})
    slot_of = {user_id: row for row, user_id in enumerate(user_ids)}

    items = store.allocate_items([interaction.item_id for interaction in interactions])
    slots = np.array([slot_of[interaction.user_id] for interaction in interactions], dtype=np.int32)
    model = RecurrentBPR(settings.model_config())
    states = UserStateBatch.empty(len(user_ids), HIDDEN_SIZE, WINDOW)
    model.train_batch(
        states, slots, items, np.zeros(len(items), dtype=np.int32), np.arange(len(items), dtype=np.int64),
    )

    store.save_states(user_ids, states, topic=TOPIC, offsets={0: len(items) - 1}, new_users=len(user_ids))
    CheckpointStore(settings.checkpoint_dir).save(model, len(items))
    return Seeded(settings, store, model, states, user_ids)


@pytest.fixture
def settings(redis_server, key_prefix, tmp_path) -> Settings:
    return serve_settings(redis_server.url, key_prefix, tmp_path / "checkpoints", CLOSED_BROKER)


@pytest.fixture
def store(redis_client, settings) -> RedisStore:
    return RedisStore(redis_client, prefix=settings.key_prefix, hidden_size=HIDDEN_SIZE, window=WINDOW)


@pytest.fixture
def seeded(settings, store) -> Seeded:
    return seed_model(settings, store)


@pytest.fixture
def recommender(seeded, store) -> Recommender:
    watcher = ModelWatcher(CheckpointStore(seeded.settings.checkpoint_dir), seeded.settings.model_config(), 60.0)
    watcher.refresh()
    return Recommender(store, watcher)


# Request parameters.


@given(st.integers(min_value=1, max_value=MAX_K))
def test_parse_k_accepts_allowed_range(k):
    assert parse_k([str(k)]) == k


@given(st.integers().filter(lambda k: not 1 <= k <= MAX_K))
def test_parse_k_rejects_outside_range(k):
    with pytest.raises(InvalidParameterError) as raised:
        parse_k([str(k)])

    assert raised.value.parameter == "k"
    assert f"1 to {MAX_K}" in str(raised.value)


@given(st.text(max_size=12).filter(lambda text: not (text.isascii() and text.isdigit())))
def test_parse_k_rejects_non_digits(text):
    with pytest.raises(InvalidParameterError):
        parse_k([text])


def test_parse_k_default_when_absent():
    assert parse_k([]) == DEFAULT_K


def test_parse_k_rejects_repeated():
    with pytest.raises(InvalidParameterError, match="given 2 times"):
        parse_k(["5", "6"])


@given(st.text(min_size=1, max_size=64).filter(lambda text: not text.isspace()))
def test_parse_user_id_accepts_valid(user_id):
    assert parse_user_id([user_id], 64) == user_id


@pytest.mark.parametrize(
    "values, problem",
    [([], "Missing user_id"), ([""], "Invalid user_id"), (["  \t"], "Invalid user_id"),
     (["a" * 65], "65 characters"), (["a", "b"], "given 2 times")],
)
def test_parse_user_id_rejects_invalid(values, problem):
    with pytest.raises(InvalidParameterError, match=problem) as raised:
        parse_user_id(values, 64)

    assert raised.value.parameter == "user_id"


@pytest.mark.parametrize("values, expected", [([], False), (["true"], True), (["false"], False)])
def test_parse_exclude_recent_accepts_booleans(values, expected):
    assert parse_exclude_recent(values) is expected


@given(st.text(max_size=10).filter(lambda text: text not in ("true", "false")))
def test_parse_exclude_recent_rejects_other_text(text):
    with pytest.raises(InvalidParameterError) as raised:
        parse_exclude_recent([text])

    assert raised.value.allowed == "true or false"


@given(
    st.sampled_from(["127.0.0.1", "0.0.0.0", "localhost", "serve.example"]),
    st.integers(min_value=0, max_value=65535),
)
def test_parse_address_round_trip(host, port):
    assert parse_address(f"{host}:{port}") == (host, port)


@pytest.mark.parametrize("address", ["", "8000", ":8000", "host:", "host:port", "host:65536", "host:-1"])
def test_parse_address_rejects_invalid(address):
    with pytest.raises(ValueError, match="expected host:port"):
        parse_address(address)


# Ranking.


@given(
    st.lists(st.floats(min_value=-1e6, max_value=1e6, width=32), min_size=1, max_size=60),
    st.data(),
)
def test_rank_by_scores_orders_and_excludes(values, data):
    scores = np.array(values, dtype=np.float32)
    exclude = np.array(
        data.draw(st.lists(st.integers(0, len(values) - 1), unique=True, max_size=len(values))), dtype=np.int64
    )
    k = data.draw(st.integers(1, 80))

    indexes, ranked = rank_by_scores(scores.copy(), exclude, k)

    assert len(indexes) == min(k, len(values) - len(exclude))
    assert not set(indexes.tolist()) & set(exclude.tolist())
    assert np.all(np.diff(ranked) <= 0)
    kept = np.setdiff1d(np.arange(len(values)), exclude)
    if len(indexes) and len(kept) > len(indexes):
        assert ranked[-1] >= np.sort(scores[kept])[::-1][len(indexes)]


def test_rank_by_scores_skips_unknown_slots():
    scores = np.array([1.0, -np.inf, 3.0, np.nan, 2.0], dtype=np.float32)

    indexes, ranked = rank_by_scores(scores, np.empty(0, dtype=np.int64), 10)

    assert indexes.tolist() == [2, 4, 0]
    assert ranked.tolist() == [3.0, 2.0, 1.0]


@given(st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=40))
def test_popularity_order_by_count_then_index(counts):
    item_count = np.array(counts, dtype=np.int64)

    order = popularity_order(item_count).tolist()

    expected = sorted((index for index, count in enumerate(counts) if count > 0), key=lambda i: (-counts[i], i))
    assert order == expected


def test_rank_by_popularity_skips_excluded():
    item_count = np.array([5, 0, 9, 9, 1], dtype=np.int64)
    order = popularity_order(item_count)

    indexes, scores = rank_by_popularity(order, item_count, np.array([2], dtype=np.int64), 3)

    assert indexes.tolist() == [3, 0, 4]
    assert scores.tolist() == [9.0, 5.0, 1.0]


# The recommender on a real Redis and a real checkpoint.


def test_recommender_known_user_uses_model(seeded, recommender):
    result = recommender.recommend("u3", 7)

    assert result.source == "model"
    assert result.item_ids == seeded.expected_top("u3", 7)
    assert result.user_events == int(seeded.states.count[seeded.row("u3")])


def test_recommender_scores_match_kernel(seeded, recommender):
    hidden = seeded.states.hidden[seeded.row("u5")]
    indexes, scores = seeded.model.top_k(hidden, 5)

    result = recommender.recommend("u5", 5)

    np.testing.assert_allclose(result.scores, scores, rtol=1e-6)
    assert result.item_ids == seeded.store.item_ids_of(indexes.tolist())


def test_recommender_unknown_user_uses_popularity(seeded, recommender):
    result = recommender.recommend("never-seen", 5)

    counts = seeded.model.stats.item_count
    expected = popularity_order(counts)[:5]
    assert result.source == "popularity"
    assert result.item_ids == seeded.store.item_ids_of(expected.tolist())
    assert result.scores == counts[expected].astype(float).tolist()
    assert result.user_events == 0


def test_recommender_exclude_recent_drops_window(seeded, recommender):
    row = seeded.row("u2")
    window = seeded.states.window[row, : seeded.states.window_len[row]].tolist()
    recent = set(seeded.store.item_ids_of(window))
    known = seeded.model.known_items

    result = recommender.recommend("u2", known, exclude_recent=True)

    assert recent, "the seeded user has an empty window"
    assert not recent & set(result.item_ids)
    assert len(result.item_ids) == known - len(recent)


def test_recommender_k_above_known_items_returns_all(seeded, recommender):
    result = recommender.recommend("u1", MAX_K)

    assert len(result.item_ids) == seeded.model.known_items
    assert len(set(result.item_ids)) == len(result.item_ids)


def test_recommender_without_checkpoint_raises(settings, store, tmp_path):
    watcher = ModelWatcher(CheckpointStore(tmp_path / "empty"), settings.model_config(), 60.0)
    watcher.refresh()

    with pytest.raises(ModelNotLoadedError, match="no readable checkpoint"):
        Recommender(store, watcher).recommend("u1", 5)


# Reloading checkpoints.


def test_model_watcher_loads_newer_checkpoint(seeded):
    checkpoints = CheckpointStore(seeded.settings.checkpoint_dir)
    watcher = ModelWatcher(checkpoints, seeded.settings.model_config(), 60.0)
    watcher.refresh()
    first = watcher.current.path

    newer = checkpoints.save(seeded.model, 2)

    assert watcher.refresh() is True
    assert watcher.current.path == newer
    assert newer != first


def test_model_watcher_keeps_model_on_damaged_newer(seeded):
    checkpoints = CheckpointStore(seeded.settings.checkpoint_dir)
    watcher = ModelWatcher(checkpoints, seeded.settings.model_config(), 60.0)
    watcher.refresh()
    current = watcher.current.path

    damaged = checkpoints.directory / f"model-{time.time_ns():020d}-9.npz"
    damaged.write_bytes(b"not a checkpoint")

    assert watcher.refresh() is False
    assert watcher.current.path == current


def test_model_watcher_keeps_model_on_other_shape(seeded, tmp_path):
    checkpoints = CheckpointStore(seeded.settings.checkpoint_dir)
    watcher = ModelWatcher(checkpoints, seeded.settings.model_config(), 60.0)
    watcher.refresh()
    current = watcher.current.path

    other = RecurrentBPR(Settings(hidden_size=HIDDEN_SIZE + 1, window=WINDOW).model_config())
    checkpoints.save(other, 1)

    assert watcher.refresh() is False
    assert watcher.current.path == current


def test_model_watcher_reloads_in_background(seeded):
    checkpoints = CheckpointStore(seeded.settings.checkpoint_dir)
    watcher = ModelWatcher(checkpoints, seeded.settings.model_config(), 0.2)
    watcher.start()
    try:
        newer = checkpoints.save(seeded.model, 3)
        deadline = time.monotonic() + 5.0
        while watcher.current.path != newer and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        watcher.stop()

    assert watcher.current.path == newer


# HTTP, against uvicorn on a loopback port.


class RunningServer:
    """A uvicorn server of a ServeService in a thread, at ``url``."""

    def __init__(self, service) -> None:
        self.service = service
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = make_server(service, f"127.0.0.1:{self.port}")
        self._thread = threading.Thread(target=self._server.run, name="uvicorn-test", daemon=True)

    def __enter__(self) -> "RunningServer":
        self.service.start()
        self._thread.start()
        deadline = time.monotonic() + 10.0
        while not self._server.started:
            assert self._thread.is_alive(), "uvicorn exited during start"
            assert time.monotonic() < deadline, "uvicorn did not start within 10 s"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self.service.close()

    def get(self, path: str) -> tuple[int, dict, dict]:
        """Send GET ``path``; return the status, the headers and the JSON body."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return response.status, dict(response.headers), json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), json.loads(error.read())

    def send(self, method: str, path: str) -> tuple[int, dict, dict]:
        request = urllib.request.Request(self.url + path, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), json.loads(error.read())


@pytest.fixture
def server(seeded, broker):
    settings = serve_settings(
        seeded.settings.redis_url, seeded.settings.key_prefix, Path(seeded.settings.checkpoint_dir), broker
    )
    with RunningServer(build_service(settings)) as running:
        yield running


def test_http_recommend_known_user(server, seeded):
    status, headers, body = server.get("/recommend?user_id=u4&k=6")

    assert status == 200
    assert headers["content-type"] == "application/json"
    assert body["source"] == "model"
    assert [item["item_id"] for item in body["items"]] == seeded.expected_top("u4", 6)


def test_http_recommend_unknown_user_is_not_error(server):
    status, _, body = server.get("/recommend?user_id=nobody")

    assert status == 200
    assert body["source"] == "popularity"
    assert len(body["items"]) == DEFAULT_K


def test_http_recommend_exclude_recent(server, seeded):
    row = seeded.row("u6")
    recent = set(seeded.store.item_ids_of(seeded.states.window[row, : seeded.states.window_len[row]].tolist()))

    status, _, body = server.get(f"/recommend?user_id=u6&k={MAX_K}&exclude_recent=true")

    assert status == 200
    assert not recent & {item["item_id"] for item in body["items"]}


@pytest.mark.parametrize(
    "query, parameter, allowed",
    [
        ("user_id=u1&k=0", "k", "from 1 to 1000"),
        ("user_id=u1&k=1001", "k", "from 1 to 1000"),
        ("user_id=u1&k=ten", "k", "from 1 to 1000"),
        ("user_id=u1&k=2.5", "k", "from 1 to 1000"),
        ("k=5", "user_id", "1 to 256 characters"),
        ("user_id=%20%20", "user_id", "not only whitespace"),
        ("user_id=u1&exclude_recent=yes", "exclude_recent", "true or false"),
    ],
)
def test_http_recommend_rejects_bad_parameter(server, query, parameter, allowed):
    status, _, body = server.get(f"/recommend?{query}")

    assert status == 400
    assert body["error"] == "invalid_parameter"
    assert body["parameter"] == parameter
    assert allowed in body["allowed"]


def test_http_recommend_503_without_model(redis_server, key_prefix, tmp_path, broker):
    settings = serve_settings(redis_server.url, key_prefix, tmp_path / "empty", broker)

    with RunningServer(build_service(settings)) as running:
        status, headers, body = running.get("/recommend?user_id=u1")

    assert status == 503
    assert body["error"] == "model_not_loaded"
    assert headers["retry-after"] == "5"


def test_http_recommend_503_when_redis_down(seeded, broker):
    settings = serve_settings(
        f"redis://{CLOSED_BROKER}/0", seeded.settings.key_prefix, Path(seeded.settings.checkpoint_dir), broker
    )

    with RunningServer(build_service(settings)) as running:
        status, _, body = running.get("/recommend?user_id=u1")
        ready_status, _, readiness = running.get("/readyz")

    assert status == 503
    assert body["error"] == "redis_unavailable"
    assert ready_status == 503
    assert readiness["checks"]["redis"]["ok"] is False


def test_http_healthz(server):
    status, _, body = server.get("/healthz")

    assert status == 200
    assert body == {"status": "ok"}


def test_http_readyz_ready(server):
    status, _, body = server.get("/readyz")

    assert status == 200
    assert body["status"] == "ready"
    assert {name: check["ok"] for name, check in body["checks"].items()} == {"redis": True, "broker": True, "model": True}


def test_http_readyz_broker_unreachable(seeded):
    with RunningServer(build_service(seeded.settings)) as running:
        status, _, body = running.get("/readyz")

    assert status == 503
    assert body["checks"]["broker"]["ok"] is False
    assert CLOSED_BROKER in body["checks"]["broker"]["detail"]


def test_http_readyz_without_model(redis_server, key_prefix, tmp_path, broker):
    settings = serve_settings(redis_server.url, key_prefix, tmp_path / "empty", broker)

    with RunningServer(build_service(settings)) as running:
        status, _, body = running.get("/readyz")

    assert status == 503
    assert body["checks"]["model"]["ok"] is False
    assert body["checks"]["redis"]["ok"] is True


def test_http_serves_newer_checkpoint_after_poll(seeded, broker):
    settings = serve_settings(seeded.settings.redis_url, seeded.settings.key_prefix,
                              Path(seeded.settings.checkpoint_dir), broker)
    with RunningServer(build_service(settings, poll_seconds=0.2)) as running:
        _, _, before = running.get("/recommend?user_id=u1")
        newer = CheckpointStore(settings.checkpoint_dir).save(seeded.model, 4)
        deadline = time.monotonic() + 5.0
        after = before
        while after["checkpoint"] != newer.name and time.monotonic() < deadline:
            time.sleep(0.05)
            _, _, after = running.get("/recommend?user_id=u1")

    assert before["checkpoint"] != newer.name
    assert after["checkpoint"] == newer.name


def test_http_unknown_path_returns_json_404(server):
    status, _, body = server.get("/nothing-here")

    assert status == 404
    assert body["error"] == "not_found"


def test_http_wrong_method_returns_json_405(server):
    status, headers, body = server.send("POST", "/recommend?user_id=u1")

    assert status == 405
    assert body["error"] == "method_not_allowed"
    assert "GET" in headers["allow"]


def test_http_openapi_states_id_limit(server):
    status, _, document = server.get("/openapi.json")

    parameters = {p["name"]: p for p in document["paths"]["/recommend"]["get"]["parameters"]}
    assert status == 200
    assert document["openapi"].startswith("3.")
    assert parameters["user_id"]["schema"]["maxLength"] == server.service.settings.max_id_length
    assert parameters["k"]["schema"]["maximum"] == MAX_K
    assert document == load_openapi()


# Schemathesis generates requests from the OpenAPI document and checks every
# response of the running server against it: status codes, content types and
# body schemas. The document is loaded from the package file, which the test
# above compares with the served one, because schemathesis 4.32's lazy fixture
# loader fails on pytest 9.2 (it sets Function._nodeid, which pytest 9.2 removed).
api_schema = schemathesis.openapi.from_dict(load_openapi())


@api_schema.parametrize()
@hypothesis_settings(
    max_examples=40, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_http_conforms_to_openapi(case, server):
    case.call_and_validate(base_url=server.url)


# Command line.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="drnn-stream")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_command(commands)
    add_recommend_command(commands)
    return parser


def test_serve_command_defaults():
    args = build_parser().parse_args(["serve"])

    assert args.serve_address == DEFAULT_SERVE_ADDRESS
    assert args.checkpoint_poll_seconds == 5.0
    assert args.run.__name__ == "run_serve"


def test_serve_command_reads_settings_flags():
    args = build_parser().parse_args(
        ["serve", "--serve-address", "0.0.0.0:9000", "--redis-url", "redis://redis:6379/1", "--key-prefix", "p1"]
    )

    loaded = load_settings(args, environ={})
    assert args.serve_address == "0.0.0.0:9000"
    assert loaded.redis_url == "redis://redis:6379/1"
    assert loaded.key_prefix == "p1"


@pytest.mark.parametrize(
    "argv",
    [["serve", "--serve-address", "nowhere"], ["serve", "--checkpoint-poll-seconds", "0"],
     ["recommend", "u1", "--k", "0"], ["recommend", "u1", "--k", "1001"], ["recommend"]],
)
def test_cli_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(argv)

    assert raised.value.code == 2


SERVE_SCRIPT = """
import argparse, sys
from streamer.serve import add_serve_command
from streamer.settings import load_settings
parser = argparse.ArgumentParser()
add_serve_command(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.run(load_settings(args), args))
"""


def test_serve_command_stops_cleanly_on_sigterm(seeded):
    port = free_port()
    command = [
        sys.executable, "-c", SERVE_SCRIPT, "serve", "--serve-address", f"127.0.0.1:{port}",
        "--redis-url", seeded.settings.redis_url, "--key-prefix", seeded.settings.key_prefix,
        "--hidden-size", str(HIDDEN_SIZE), "--window", str(WINDOW),
        "--checkpoint-dir", seeded.settings.checkpoint_dir, "--bootstrap-servers", CLOSED_BROKER,
    ]
    process = subprocess.Popen(command, cwd=Path(__file__).resolve().parent.parent, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30.0
        status = None
        while status != 200 and time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/recommend?user_id=u1", timeout=2) as response:
                    status = response.status
            except OSError:
                time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert status == 200
    assert returncode == 0, process.stderr.read()


def test_recommend_command_prints_top_k(seeded, capsys):
    args = build_parser().parse_args(["recommend", "u3", "--k", "4", "--json"])

    status = run_recommend(seeded.settings, args)

    body = json.loads(capsys.readouterr().out)
    assert status == 0
    assert body["source"] == "model"
    assert [item["item_id"] for item in body["items"]] == seeded.expected_top("u3", 4)


def test_recommend_command_prints_table(seeded, capsys):
    args = build_parser().parse_args(["recommend", "never-seen", "--k", "3"])

    run_recommend(seeded.settings, args)

    lines = capsys.readouterr().out.splitlines()
    assert "from popularity" in lines[0]
    assert len(lines) == 2 + 3


def test_recommend_command_without_checkpoint_raises(settings, tmp_path):
    args = build_parser().parse_args(["recommend", "u1"])
    empty = Settings(**{**settings.__dict__, "checkpoint_dir": str(tmp_path / "empty")})

    with pytest.raises(ModelNotLoadedError):
        run_recommend(empty, args)
