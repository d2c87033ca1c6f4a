"""Recommendation serving: top-k items from a user's live state in Redis and the newest checkpoint.

``drnn-stream serve`` serves HTTP requests; ``drnn-stream recommend`` prints the
same result without HTTP. Both rank with ``RecurrentBPR.scores`` (the
``kernels.score_items`` kernel) from the user's hidden state h(t).

The HTTP stack is Starlette on uvicorn. Both are the usual light ASGI pair in
Python: uvicorn parses HTTP/1.1 with keep-alive, applies timeouts and shuts down
gracefully on SIGTERM, and Starlette adds routing and JSON responses without
pulling in a framework. The endpoints are plain functions, so Starlette runs
them in its thread pool. There the blocking redis-py calls and the Numba kernel,
which releases the GIL, overlap across requests instead of blocking the event
loop. ``benchmarks/serve_latency.py`` measures the latency this adds.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import json
import logging
import math
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

from drnn_core.config import ModelConfig
from drnn_core.errors import ConfigError, DrnnError
from drnn_core.model import RecurrentBPR
from streamer.checkpoints import CheckpointStore
from streamer.errors import CheckpointError
from streamer.ratelimit import RateLimitedLogger
from streamer.settings import Settings, add_arguments
from streamer.store import RedisStore, StoreError

__all__ = [
    "InvalidParameterError",
    "LoadedModel",
    "ModelNotLoadedError",
    "ModelWatcher",
    "BrokerProbe",
    "Recommendation",
    "Recommender",
    "ServeService",
    "add_recommend_command",
    "add_serve_command",
    "build_service",
    "create_app",
    "make_serving_store",
    "parse_address",
    "parse_exclude_recent",
    "parse_k",
    "parse_user_id",
    "popularity_order",
    "rank_by_popularity",
    "rank_by_scores",
    "serve_http",
]

logger = logging.getLogger(__name__)

DEFAULT_K = 10
MAX_K = 1000
MAX_K_DIGITS = 10
DEFAULT_SERVE_ADDRESS = "127.0.0.1:8000"
DEFAULT_CHECKPOINT_POLL_S = 5.0
MIN_CHECKPOINT_POLL_S = 0.1
MAX_CHECKPOINT_POLL_S = 3600.0
BROKER_CHECK_TTL_S = 5.0
BROKER_CONNECT_TIMEOUT_S = 1.0
REDIS_TIMEOUT_S = 2.0
RETRY_AFTER_S = 5
SOURCE_MODEL = "model"
SOURCE_POPULARITY = "popularity"

# Settings that serve and recommend read; the others keep their defaults.
SERVE_SETTINGS = (
    "redis_url", "key_prefix", "hidden_size", "window", "checkpoint_dir",
    "bootstrap_servers", "max_id_length", "log_level",
)
RECOMMEND_SETTINGS = tuple(name for name in SERVE_SETTINGS if name != "bootstrap_servers")

_DIGITS = re.compile(r"[0-9]+")


class InvalidParameterError(DrnnError, ValueError):
    """A request parameter is missing or outside its allowed values.

    Attributes
    ----------
    parameter : str
        Name of the query parameter.
    allowed : str
        The allowed values, in words.
    """

    def __init__(self, parameter: str, message: str, allowed: str) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.allowed = allowed


class ModelNotLoadedError(DrnnError):
    """No checkpoint has been loaded yet, so the service cannot rank."""


# Request parameters.


def parse_user_id(values: list[str], max_id_length: int) -> str:
    """Return the single user id of a request, with the checks the worker applies to event ids.

    Raises
    ------
    InvalidParameterError
        If the id is missing, repeated, empty, whitespace-only or longer than ``max_id_length``.
    """
    allowed = f"one string of 1 to {max_id_length} characters, not only whitespace"
    if not values:
        raise InvalidParameterError("user_id", f"Missing user_id: expected {allowed}, as ?user_id=...", allowed)
    if len(values) > 1:
        raise InvalidParameterError("user_id", f"Invalid user_id: given {len(values)} times, expected {allowed}", allowed)

    user_id = values[0]
    if len(user_id) > max_id_length:
        raise InvalidParameterError(
            "user_id", f"Invalid user_id: {len(user_id)} characters, expected {allowed}", allowed
        )
    if not user_id or user_id.isspace():
        raise InvalidParameterError("user_id", f"Invalid user_id={user_id!r}: expected {allowed}", allowed)
    return user_id


def parse_k(values: list[str]) -> int:
    """Return the number of items requested: DEFAULT_K when absent, else a decimal integer from 1 to MAX_K.

    Raises
    ------
    InvalidParameterError
        If k is repeated, not a plain decimal integer, or outside 1..MAX_K.
    """
    allowed = f"an integer from 1 to {MAX_K}"
    if not values:
        return DEFAULT_K
    if len(values) > 1:
        raise InvalidParameterError("k", f"Invalid k: given {len(values)} times, expected {allowed}", allowed)

    text = values[0]
    # The length bound keeps int() away from very long digit strings.
    if len(text) > MAX_K_DIGITS or not _DIGITS.fullmatch(text):
        raise InvalidParameterError("k", f"Invalid k={text[:20]!r}: expected {allowed}", allowed)
    k = int(text)
    if not 1 <= k <= MAX_K:
        raise InvalidParameterError("k", f"Invalid k={k}: expected {allowed}", allowed)
    return k


def parse_exclude_recent(values: list[str]) -> bool:
    """Return the exclude_recent flag: False when absent, else exactly ``true`` or ``false``.

    Raises
    ------
    InvalidParameterError
        If the flag is repeated or has another value.
    """
    allowed = "true or false"
    if not values:
        return False
    if len(values) > 1:
        raise InvalidParameterError(
            "exclude_recent", f"Invalid exclude_recent: given {len(values)} times, expected {allowed}", allowed
        )
    if values[0] not in ("true", "false"):
        raise InvalidParameterError(
            "exclude_recent", f"Invalid exclude_recent={values[0][:20]!r}: expected {allowed}", allowed
        )
    return values[0] == "true"


def parse_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` into its host and port.

    Raises
    ------
    ConfigError
        If the host is empty or the port is not an integer from 0 to 65535.
    """
    host, separator, port = address.rpartition(":")
    host = host.strip("[]")
    if not separator or not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"Invalid serve address {address!r}: expected host:port with a port from 0 to 65535, "
            "e.g. 127.0.0.1:8000 or 0.0.0.0:8000"
        )
    return host, int(port)


# Ranking.


def rank_by_scores(scores: np.ndarray, exclude: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the k items of highest finite score, best first.

    Parameters
    ----------
    scores : ndarray, shape (n,), float32
        One score per item slot, -inf (or NaN) for slots that are not known
        items. Overwritten with -inf at ``exclude``.
    exclude : ndarray, shape (m,), int
        Item indexes to leave out, each from 0 to n - 1.
    k : int
        Number of items requested, 1 or more.

    Returns
    -------
    indexes : ndarray, shape (min(k, candidates),), int64
    item_scores : ndarray, same shape, float32
        Equal scores come out in any order.
    """
    scores[exclude] = -np.inf
    # NaN compares false and argpartition sorts it last, so NaN slots are left out like -inf ones.
    k = min(k, int(np.count_nonzero(scores > -np.inf)))
    if k <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)

    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.argsort(-scores[top], kind="stable")].astype(np.int64)
    return top, scores[top]


def popularity_order(item_count: np.ndarray) -> np.ndarray:
    """Return the indexes of the known items by descending count, ties by ascending index.

    Parameters
    ----------
    item_count : ndarray, shape (n,), int64
        Events seen of each item; items with a count of 0 are not known.

    Returns
    -------
    ndarray, shape (known,), int64
    """
    known = np.flatnonzero(item_count > 0)
    return known[np.lexsort((known, -item_count[known]))].astype(np.int64)


def rank_by_popularity(
    order: np.ndarray, item_count: np.ndarray, exclude: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return the first k items of ``order`` that are not in ``exclude``, with their counts as scores.

    Returns
    -------
    indexes : ndarray, shape (<= k,), int64
    item_scores : ndarray, same shape, float64
        The event count of each item.
    """
    head = order[: k + exclude.size]
    if exclude.size:
        head = head[~np.isin(head, exclude)]
    head = head[:k]
    return head, item_count[head].astype(np.float64)


# The model, reloaded from the checkpoint directory.


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model loaded from a checkpoint, with the item order of the popularity fallback.

    Attributes
    ----------
    model : RecurrentBPR
    path : Path
        The checkpoint file it was loaded from.
    popular : ndarray, shape (known,), int64
        Known item indexes by descending event count.
    """

    model: RecurrentBPR
    path: Path
    popular: np.ndarray

    @classmethod
    def of(cls, model: RecurrentBPR, path: Path) -> "LoadedModel":
        """Wrap a loaded model and compute its popularity order."""
        return cls(model=model, path=path, popular=popularity_order(model.stats.item_count))


class ModelWatcher:
    """Keeps the newest checkpoint of a directory loaded, checking for a newer file every ``poll_seconds``.

    A background thread started by ``start()`` does the checks, so requests only
    read ``current``. A newer file replaces the model as one reference swap, and
    requests in flight finish on the model they started with.

    Parameters
    ----------
    checkpoints : CheckpointStore
    config : ModelConfig
        Must have the h and K of the checkpoints.
    poll_seconds : float
        Seconds between two listings of the directory.
    """

    def __init__(self, checkpoints: CheckpointStore, config: ModelConfig, poll_seconds: float) -> None:
        self.checkpoints = checkpoints
        self.config = config
        self.poll_seconds = poll_seconds
        self._current: LoadedModel | None = None
        self._last_seen: Path | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> LoadedModel | None:
        """The loaded model, or None before the first readable checkpoint."""
        return self._current

    def refresh(self) -> bool:
        """List the directory once and load its newest checkpoint if it is newer than the current one.

        A damaged newest file falls back to the next readable one, as at the
        worker's start, but never to a file older than the current model. A file
        is tried once, so a damaged one is not re-read at every check.

        Returns
        -------
        bool
            Whether another model was loaded.
        """
        with self._lock:
            try:
                paths = self.checkpoints.paths()
            except OSError as exc:
                logger.error("Failed to list checkpoint directory %s: %s", self.checkpoints.directory, exc)
                return False
            if not paths or paths[0] == self._last_seen:
                return False
            self._last_seen = paths[0]

            try:
                loaded = self.checkpoints.load_newest(self.config)
            except CheckpointError as exc:
                logger.error("Keeping the current model: %s", exc)
                return False
            if loaded is None:
                return False

            model, path = loaded
            current = self._current
            if current is not None and path.name <= current.path.name:
                return False
            self._current = LoadedModel.of(model, path)

        logger.info("Serving checkpoint %s (%d known items)", path, model.known_items)
        return True

    def start(self) -> None:
        """Load the newest checkpoint now, then check for newer ones in a daemon thread."""
        self.refresh()
        if self._current is None:
            logger.warning(
                "No readable checkpoint in %s yet: /recommend returns 503 until the worker writes one "
                "(checked every %.1f s)", self.checkpoints.directory, self.poll_seconds,
            )
        self._thread = threading.Thread(target=self._run, name="checkpoint-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.refresh()


# Readiness of the broker.


class BrokerProbe:
    """Whether a TCP connection to one of the Kafka bootstrap servers opens, cached for ``ttl_seconds``.

    A TCP connect is the cheapest check that the broker's listener is up; it
    does not prove that the broker serves Kafka requests.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        ttl_seconds: float = BROKER_CHECK_TTL_S,
        timeout_seconds: float = BROKER_CONNECT_TIMEOUT_S,
    ) -> None:
        self.servers = [parse_address(server.strip()) for server in bootstrap_servers.split(",") if server.strip()]
        self.ttl_seconds = ttl_seconds
        self.timeout_seconds = timeout_seconds
        self._lock = threading.Lock()
        self._checked_at = -math.inf
        self._result: tuple[bool, str] = (False, "not checked yet")

    def check(self) -> tuple[bool, str]:
        """Return (reachable, detail), connecting only if the last check is older than the TTL."""
        with self._lock:
            if time.monotonic() - self._checked_at >= self.ttl_seconds:
                self._result = self._connect_any()
                self._checked_at = time.monotonic()
            return self._result

    def _connect_any(self) -> tuple[bool, str]:
        failures = []
        for host, port in self.servers:
            try:
                with socket.create_connection((host, port), timeout=self.timeout_seconds):
                    return True, f"{host}:{port} accepts TCP connections"
            except OSError as exc:
                failures.append(f"{host}:{port}: {exc}")
        return False, "no bootstrap server accepts TCP connections (" + "; ".join(failures) + ")"


# Recommendations.


@dataclasses.dataclass
class Recommendation:
    """Top-k items of one user.

    Attributes
    ----------
    user_id : str
    source : str
        "model" when ranked from the user's hidden state, "popularity" for a
        user with no stored state.
    item_ids : list of str
        Best first.
    scores : list of float
        h(t) . V[j] for the model, the item's event count for popularity.
    user_events : int
        Events applied to the user's state (0 for a user with no state).
    checkpoint : str
        File name of the checkpoint that ranked the items.
    """

    user_id: str
    source: str
    item_ids: list[str]
    scores: list[float]
    user_events: int
    checkpoint: str

    def as_dict(self) -> dict[str, Any]:
        """Return the JSON body of a /recommend response."""
        return {
            "user_id": self.user_id,
            "source": self.source,
            "items": [{"item_id": item, "score": score} for item, score in zip(self.item_ids, self.scores)],
            "user_events": self.user_events,
            "checkpoint": self.checkpoint,
        }

    def as_text(self) -> str:
        """Return a table of the items for the terminal."""
        lines = [
            f"user {self.user_id!r}: {len(self.item_ids)} items from {self.source} "
            f"(checkpoint {self.checkpoint}, {self.user_events} events of the user)",
            f"{'rank':>4}  {'score':>12}  item_id",
        ]
        for rank, (item, score) in enumerate(zip(self.item_ids, self.scores), start=1):
            lines.append(f"{rank:>4}  {score:>12.6g}  {item}")
        return "\n".join(lines)


class Recommender:
    """Ranks items for a user from the user's state in Redis and the watched model.

    Parameters
    ----------
    store : RedisStore
        States and item ids; may be shared between threads.
    watcher : ModelWatcher
    """

    def __init__(self, store: RedisStore, watcher: ModelWatcher) -> None:
        self.store = store
        self.watcher = watcher
        self._log = RateLimitedLogger(logger)

    def recommend(self, user_id: str, k: int, *, exclude_recent: bool = False) -> Recommendation:
        """Return the top-k items of ``user_id``.

        A user with no state in Redis, or whose state is corrupt, gets the most
        frequent items of the model instead. ``exclude_recent`` leaves out the
        items in the user's window (the last K items).

        Raises
        ------
        ModelNotLoadedError
            If no checkpoint has been loaded yet.
        StoreError
            If Redis fails.
        """
        loaded = self.watcher.current
        if loaded is None:
            raise ModelNotLoadedError(
                f"No model is loaded: {self.watcher.checkpoints.directory} contains no readable checkpoint yet. "
                "Wait until the worker writes one, or check that checkpoint_dir is the worker's."
            )

        states, _ = self.store.load_states([user_id])
        events = int(states.count[0])
        exclude = self._recent_items(states, loaded.model) if exclude_recent else np.empty(0, dtype=np.int64)
        hidden = states.hidden[0]

        if events > 0 and np.isfinite(hidden).all():
            indexes, scores = rank_by_scores(loaded.model.scores(hidden), exclude, k)
            source = SOURCE_MODEL
        else:
            if events > 0:
                self._log.log(logging.WARNING, "non_finite_state", "User %r has a non-finite hidden state: "
                              "recommending by popularity", user_id)
            indexes, scores = rank_by_popularity(loaded.popular, loaded.model.stats.item_count, exclude, k)
            source = SOURCE_POPULARITY

        item_ids, item_scores = self._with_ids(indexes, scores)
        return Recommendation(
            user_id=user_id, source=source, item_ids=item_ids, scores=item_scores,
            user_events=events, checkpoint=loaded.path.name,
        )

    @staticmethod
    def _recent_items(states, model: RecurrentBPR) -> np.ndarray:
        window = states.window[0, : int(states.window_len[0])].astype(np.int64)
        # Items allocated after the checkpoint have no row in the model and no score to remove.
        return window[(window >= 0) & (window < model.capacity)]

    def _with_ids(self, indexes: np.ndarray, scores: np.ndarray) -> tuple[list[str], list[float]]:
        item_ids = self.store.item_ids_of(indexes.tolist())
        kept = [(item, float(score)) for item, score in zip(item_ids, scores.tolist()) if item is not None]
        if len(kept) < len(item_ids):
            self._log.log(
                logging.WARNING, "missing_item_ids",
                "Dropped %d ranked item indexes with no item id under prefix %r; the checkpoint "
                "may come from another key prefix", len(item_ids) - len(kept), self.store.prefix,
            )
        return [item for item, _ in kept], [score for _, score in kept]


# The service and its HTTP application.


class ServeService:
    """Everything a serving process holds: the store, the model watcher, the recommender and the broker probe."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: RedisStore,
        watcher: ModelWatcher,
        broker: BrokerProbe,
    ) -> None:
        self.settings = settings
        self.store = store
        self.watcher = watcher
        self.broker = broker
        self.recommender = Recommender(store, watcher)
        self.log = RateLimitedLogger(logger)
        self._openapi = _openapi_for(settings.max_id_length)

    def readiness(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        """Check Redis (PING), the broker (cached TCP connect) and the model; return (ready, checks)."""
        checks = {}
        try:
            self.store.ping()
            checks["redis"] = {"ok": True, "detail": "PING answered"}
        except StoreError as exc:
            checks["redis"] = {"ok": False, "detail": str(exc)}

        reachable, detail = self.broker.check()
        checks["broker"] = {"ok": reachable, "detail": detail}

        loaded = self.watcher.current
        if loaded is None:
            checks["model"] = {"ok": False, "detail": f"no readable checkpoint in {self.watcher.checkpoints.directory}"}
        else:
            checks["model"] = {"ok": True, "detail": f"{loaded.path.name}, {loaded.model.known_items} known items"}
        return all(check["ok"] for check in checks.values()), checks

    def openapi(self) -> dict[str, Any]:
        """Return the OpenAPI document, with the user_id length limit of the settings."""
        return self._openapi

    def start(self) -> None:
        """Load the newest checkpoint and start watching for newer ones."""
        self.watcher.start()

    def close(self) -> None:
        """Stop the watcher and close the Redis connections."""
        self.watcher.stop()
        self.store.client.close()


def load_openapi() -> dict[str, Any]:
    """Return a fresh copy of the OpenAPI document shipped as streamer/openapi.json."""
    text = importlib.resources.files("streamer").joinpath("openapi.json").read_text(encoding="utf-8")
    return json.loads(text)


def _openapi_for(max_id_length: int) -> dict[str, Any]:
    document = load_openapi()
    for parameter in document["paths"]["/recommend"]["get"]["parameters"]:
        if parameter["name"] == "user_id":
            parameter["schema"]["maxLength"] = max_id_length
    return document


def make_serving_store(settings: Settings) -> RedisStore:
    """Create a RedisStore whose client times out after REDIS_TIMEOUT_S, so that an outage fails requests fast."""
    client = redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        health_check_interval=30,
    )
    return RedisStore(client, prefix=settings.key_prefix, hidden_size=settings.hidden_size, window=settings.window)


def build_service(settings: Settings, *, poll_seconds: float = DEFAULT_CHECKPOINT_POLL_S) -> ServeService:
    """Create the store, model watcher and broker probe from the settings; call ``start()`` to load the model."""
    watcher = ModelWatcher(CheckpointStore(settings.checkpoint_dir), settings.model_config(), poll_seconds)
    return ServeService(
        settings=settings,
        store=make_serving_store(settings),
        watcher=watcher,
        broker=BrokerProbe(settings.bootstrap_servers),
    )


def create_app(service: ServeService):
    """Build the Starlette application of the service: /recommend, /healthz, /readyz and /openapi.json."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def error(status: int, code: str, message: str, **fields: Any) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
        return JSONResponse({"error": code, "message": message, **fields}, status_code=status, headers=headers)

    def recommend(request) -> JSONResponse:
        params = request.query_params
        try:
            user_id = parse_user_id(params.getlist("user_id"), service.settings.max_id_length)
            k = parse_k(params.getlist("k"))
            exclude_recent = parse_exclude_recent(params.getlist("exclude_recent"))
        except InvalidParameterError as exc:
            return error(400, "invalid_parameter", str(exc), parameter=exc.parameter, allowed=exc.allowed)

        try:
            result = service.recommender.recommend(user_id, k, exclude_recent=exclude_recent)
        except ModelNotLoadedError as exc:
            return error(503, "model_not_loaded", str(exc))
        except StoreError as exc:
            service.log.log(logging.ERROR, "redis_unavailable", "Failed to recommend for user %r: %s", user_id, exc)
            return error(503, "redis_unavailable", str(exc))
        return JSONResponse(result.as_dict())

    def healthz(request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    def readyz(request) -> JSONResponse:
        ready, checks = service.readiness()
        if ready:
            return JSONResponse({"status": "ready", "checks": checks})
        return JSONResponse(
            {"status": "not_ready", "checks": checks}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)}
        )

    def openapi(request) -> JSONResponse:
        return JSONResponse(service.openapi())

    def http_error(request, exc: HTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        code = codes.get(exc.status_code, "http_error")
        return JSONResponse(
            {"error": code, "message": f"{exc.detail}: {request.method} {request.url.path}"},
            status_code=exc.status_code, headers=exc.headers,
        )

    def internal_error(request, exc: Exception) -> JSONResponse:
        # Starlette raises the exception again after this response, and uvicorn logs it with the traceback.
        return JSONResponse({"error": "internal_error", "message": "Internal server error; see the server log"}, status_code=500)

    routes = [
        Route("/recommend", recommend, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: internal_error})


def make_server(service: ServeService, address: str):
    """Return a uvicorn Server for the service on ``host:port``, not yet running."""
    import uvicorn

    host, port = parse_address(address)
    config = uvicorn.Config(
        create_app(service), host=host, port=port,
        log_config=None, access_log=False, lifespan="off", server_header=False,
    )
    return uvicorn.Server(config)


def serve_http(service: ServeService, address: str) -> None:
    """Serve the HTTP API on ``host:port`` until SIGINT or SIGTERM, then finish the requests in flight.

    Call it from the main thread, because it installs signal handlers.
    """
    server = make_server(service, address)
    # uvicorn handles the signals while it runs and raises them again afterwards,
    # which these handlers turn into a log line instead of a KeyboardInterrupt.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _log_stop_signal)
    server.run()


def _log_stop_signal(signum: int, frame: object) -> None:
    logger.info("Stopped serving on %s", signal.Signals(signum).name)


# Command line.


def add_serve_command(commands) -> argparse.ArgumentParser:
    """Add the ``serve`` sub-command to the sub-parsers of the drnn-stream command line."""
    parser = commands.add_parser(
        "serve", help="Serve top-k recommendations over HTTP from the user states in Redis and the newest checkpoint."
    )
    parser.add_argument(
        "--serve-address", default=DEFAULT_SERVE_ADDRESS, type=_address_argument, metavar="HOST:PORT",
        help=f"Address of the HTTP server. Default: {DEFAULT_SERVE_ADDRESS}.",
    )
    parser.add_argument(
        "--checkpoint-poll-seconds", default=DEFAULT_CHECKPOINT_POLL_S, type=_poll_seconds_argument,
        metavar="SECONDS",
        help=f"Seconds between two checks of checkpoint_dir for a newer checkpoint, from {MIN_CHECKPOINT_POLL_S} "
             f"to {MAX_CHECKPOINT_POLL_S:.0f}. Default: {DEFAULT_CHECKPOINT_POLL_S}.",
    )
    add_arguments(parser, SERVE_SETTINGS)
    parser.set_defaults(run=run_serve)
    return parser


def add_recommend_command(commands) -> argparse.ArgumentParser:
    """Add the ``recommend`` sub-command, which prints one user's top-k without HTTP."""
    parser = commands.add_parser(
        "recommend", help="Print the top-k items of one user, ranked as the serve command ranks them."
    )
    parser.add_argument("user_id", metavar="USER", help="The user id, as in the events.")
    parser.add_argument(
        "--k", default=DEFAULT_K, type=_k_argument, help=f"Number of items, from 1 to {MAX_K}. Default: {DEFAULT_K}."
    )
    parser.add_argument("--exclude-recent", action="store_true", help="Leave out the items of the user's window.")
    parser.add_argument("--json", action="store_true", help="Print the JSON body that GET /recommend returns.")
    add_arguments(parser, RECOMMEND_SETTINGS)
    parser.set_defaults(run=run_recommend)
    return parser


def run_serve(settings: Settings, args: argparse.Namespace) -> int:
    """Run the HTTP server until a signal stops it."""
    service = build_service(settings, poll_seconds=args.checkpoint_poll_seconds)
    service.start()
    try:
        serve_http(service, args.serve_address)
    finally:
        service.close()
    return 0


def run_recommend(settings: Settings, args: argparse.Namespace) -> int:
    """Print the top-k items of one user and return 0; a missing model or Redis error returns 1."""
    user_id = parse_user_id([args.user_id], settings.max_id_length)
    store = make_serving_store(settings)
    watcher = ModelWatcher(CheckpointStore(settings.checkpoint_dir), settings.model_config(), DEFAULT_CHECKPOINT_POLL_S)
    try:
        watcher.refresh()
        result = Recommender(store, watcher).recommend(user_id, args.k, exclude_recent=args.exclude_recent)
    finally:
        store.client.close()
    print(json.dumps(result.as_dict(), ensure_ascii=False) if args.json else result.as_text())
    return 0


def _address_argument(text: str) -> str:
    try:
        parse_address(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _k_argument(text: str) -> int:
    try:
        return parse_k([text])
    except InvalidParameterError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _poll_seconds_argument(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not MIN_CHECKPOINT_POLL_S <= value <= MAX_CHECKPOINT_POLL_S:
        raise argparse.ArgumentTypeError(
            f"Invalid checkpoint poll interval {text!r}: expected seconds from {MIN_CHECKPOINT_POLL_S} "
            f"to {MAX_CHECKPOINT_POLL_S:.0f}"
        )
    return value
