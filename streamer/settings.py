"""Worker settings: one frozen object filled from defaults, DRNN_* environment variables and CLI flags.

This is the only module that reads the environment. Every field documents its
unit, default and environment variable, and ``--help`` shows the same text.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import urllib.parse
from typing import Any, Mapping

from drnn_core.config import NEGATIVE_MODES, OPTIMIZERS, SAMPLERS, ModelConfig
from drnn_core.errors import ConfigError

ENV_PREFIX = "DRNN_"
KEY_PREFIX_PATTERN = re.compile(r"[A-Za-z0-9_.\-]+")
TOPIC_PATTERN = re.compile(r"[A-Za-z0-9._\-]{1,249}")


def _setting(default: Any, help: str, **limits: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **limits})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the worker, the replay and the demo can be configured with.

    Each field can be set by the flag ``--field-name`` or the environment
    variable ``DRNN_FIELD_NAME``; a flag wins over the environment.
    """

    bootstrap_servers: str = _setting("127.0.0.1:9092", "Kafka bootstrap servers, comma-separated host:port.")
    topic: str = _setting("interactions", "Topic of the interaction events.")
    dead_letter_topic: str = _setting("interactions.dlq", "Topic that receives invalid messages, with the reason in headers.")
    group_id: str = _setting("drnn-stream", "Kafka consumer group of the workers.")
    client_id: str = _setting("drnn-stream", "Kafka client id, shown in broker logs.")
    session_timeout_ms: int = _setting(10000, "Consumer group session timeout in milliseconds.", low=1000, high=3600000)
    max_poll_interval_ms: int = _setting(300000, "Longest time between polls before the member leaves the group, in milliseconds.", low=1000, high=86400000)
    batch_size: int = _setting(500, "Maximum records per poll, the micro-batch size.", low=1, high=100000)
    poll_timeout_ms: int = _setting(200, "How long one poll waits for records, in milliseconds.", low=0, high=60000)
    auto_offset_reset: str = _setting("earliest", "Where a new group starts reading: earliest or latest.", choices=("earliest", "latest"))
    redis_url: str = _setting("redis://127.0.0.1:6379/0", "Redis URL (redis:// or rediss://); a password in it is never logged.")
    redis_ssl_ca_certs: str = _setting("", "CA certificate file that verifies the Redis server of a rediss:// URL; empty: the system CAs.")
    redis_loss_policy: str = _setting(
        "continue",
        "What to do when Redis lost its data (its epoch key is gone): continue from the current offsets, "
        "or rebuild the states by re-reading the assigned partitions from their earliest offset.",
        choices=("continue", "rebuild"),
    )
    key_prefix: str = _setting("drnn", "Prefix of every Redis key, so that deployments can share one Redis.")
    security_protocol: str = _setting(
        "PLAINTEXT", "Kafka security protocol.", choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
    )
    sasl_mechanism: str = _setting("", "Kafka SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512; empty: none.", choices=("", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"))
    sasl_username: str = _setting("", "Kafka SASL user name.")
    sasl_password: str = _setting("", "Kafka SASL password; never logged.")
    ssl_cafile: str = _setting("", "CA file that verifies the Kafka brokers; empty: the system CAs.")
    ssl_certfile: str = _setting("", "Client certificate file for Kafka SSL.")
    ssl_keyfile: str = _setting("", "Client key file for Kafka SSL.")
    max_message_bytes: int = _setting(65536, "Largest accepted message value in bytes; larger ones are dead-lettered.", low=64, high=16 * 1024 * 1024)
    max_id_length: int = _setting(256, "Longest accepted user or item id in characters.", low=1, high=65536)
    hidden_size: int = _setting(64, "Model hidden size h.", low=1, high=4096)
    window: int = _setting(4, "Items kept per user and BPTT depth K.", low=1, high=64)
    state_dtype: str = _setting(
        "float32",
        "Float type of the hidden states in the Redis user-state blobs: float32, or float16 "
        "(4*h fewer bytes per user, each value rounded to 11 significant bits). Workers read both types.",
        choices=("float32", "float16"),
    )
    learning_rate: float = _setting(0.2, "Learning rate of SGD, or base learning rate of Adagrad.")
    l2: float = _setting(1e-5, "L2 penalty lambda on the parameters of each update.")
    max_grad_norm: float = _setting(5.0, "Clip each event's gradient to this global L2 norm.")
    sampler: str = _setting("uniform", "Negative sampler: uniform or popularity.", choices=SAMPLERS)
    popularity_alpha: float = _setting(0.75, "Exponent of the popularity sampler, count**alpha.")
    init_scale: float = _setting(0.1, "Standard deviation of the initial weights.")
    seed: int = _setting(42, "Seed of the initial weights and the negative sampler.", low=0, high=2**63 - 1)
    negatives: int = _setting(64, "Negatives drawn per event.", low=1, high=256)
    negative_mode: str = _setting("sum", "sum: one BPR term per negative; hardest: only the best-scored negative.", choices=NEGATIVE_MODES)
    optimizer: str = _setting("adagrad", "sgd, or adagrad: one accumulator per embedding row, per element of U and W, and per item bias.", choices=OPTIMIZERS)
    item_bias: bool = _setting(True, "Add a learned bias per item to its score.")
    recurrent_learning_rate_scale: float = _setting(1.0, "Factor on the learning rate of U and W.")
    adagrad_initial_accumulator: float = _setting(0.1, "Starting value of every Adagrad accumulator.")
    tie_embeddings: bool = _setting(True, "Use one item embedding for input and output (X = V); it must match the checkpoint loaded.")
    evaluate: bool = _setting(True, "Rank each event's item before training on it (prequential HR@10 and MRR@10).")
    evaluation_sample_every: int = _setting(1, "Worker only: rank about one event in every M, chosen by a hash of partition and offset (1: every event). `evaluate` always ranks every event.", low=1, high=1_000_000)
    checkpoint_dir: str = _setting("checkpoints", "Directory of model checkpoints; the newest is loaded at start.")
    checkpoint_every_events: int = _setting(100000, "Write a checkpoint after this many applied events (0: never by count).", low=0, high=2**62)
    checkpoint_every_seconds: float = _setting(300.0, "Write a checkpoint after this many seconds (0: never by time).", low=0.0, high=86400.0 * 365)
    checkpoints_kept: int = _setting(3, "How many checkpoint files to keep.", low=1, high=1000)
    metrics_address: str = _setting("127.0.0.1:9400", "host:port of the Prometheus metrics endpoint; empty to disable.")
    exit_when_idle_seconds: float = _setting(0.0, "Stop after this many seconds with no new records and no lag (0: run until stopped).", low=0.0, high=86400.0 * 365)
    log_level: str = _setting("INFO", "Logging level.", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _validate_field(field, getattr(self, field.name))
        _validate_address("metrics_address", self.metrics_address, allow_empty=True)
        _validate_servers(self.bootstrap_servers)
        _validate_redis_url(self.redis_url)
        if not KEY_PREFIX_PATTERN.fullmatch(self.key_prefix):
            raise ConfigError(
                f"Invalid key_prefix={self.key_prefix!r} (--key-prefix / DRNN_KEY_PREFIX): use one or more "
                "letters, digits, '_', '.' or '-', so that it cannot overlap another prefix"
            )
        for name in ("topic", "dead_letter_topic"):
            if not TOPIC_PATTERN.fullmatch(getattr(self, name)):
                raise ConfigError(
                    f"Invalid {name}={getattr(self, name)!r} (--{name.replace('_', '-')} / {ENV_PREFIX}{name.upper()}): "
                    "a Kafka topic name is 1 to 249 letters, digits, '.', '_' or '-'"
                )
        if not self.topic or self.topic == self.dead_letter_topic:
            raise ConfigError(
                f"Invalid topic={self.topic!r} and dead_letter_topic={self.dead_letter_topic!r}: "
                "both must be set and differ"
            )
        try:
            self.model_config()
        except ConfigError as exc:
            name = _field_of(str(exc))
            raise ConfigError(f"{exc} (--{name.replace('_', '-')} / {ENV_PREFIX}{name.upper()})") from None

    def model_config(self) -> ModelConfig:
        """Build the model hyperparameters from these settings."""
        return ModelConfig(
            hidden_size=self.hidden_size,
            window=self.window,
            learning_rate=self.learning_rate,
            l2=self.l2,
            max_grad_norm=self.max_grad_norm,
            sampler=self.sampler,
            popularity_alpha=self.popularity_alpha,
            init_scale=self.init_scale,
            seed=self.seed,
            negatives=self.negatives,
            negative_mode=self.negative_mode,
            optimizer=self.optimizer,
            item_bias=self.item_bias,
            recurrent_learning_rate_scale=self.recurrent_learning_rate_scale,
            adagrad_initial_accumulator=self.adagrad_initial_accumulator,
            tie_embeddings=self.tie_embeddings,
        )

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in self.redacted().items())
        return f"Settings({fields})"

    def redacted(self) -> dict[str, Any]:
        """Return the settings as a dict with every password replaced by ***, for logs."""
        values = dataclasses.asdict(self)
        values["redis_url"] = redact_url(self.redis_url)
        if self.sasl_password:
            values["sasl_password"] = "***"
        return values


ENV_VARS: dict[str, str] = {
    ENV_PREFIX + field.name.upper(): field.name for field in dataclasses.fields(Settings)
}


def _field_of(message: str) -> str:
    return message.split("=", 1)[0].removeprefix("Invalid ").strip()


def redact_url(url: str) -> str:
    """Replace the password of a URL, in its user info or a ``password`` query parameter, by ***.

    The user info runs up to the last ``@``, so a password with an unencoded
    ``/`` or ``?`` is hidden too.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    if "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        rest = f"{user}:***@{rest}" if has_password else f"{userinfo}@{rest}"
    path, question, query = rest.partition("?")
    if question:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        pairs = [(name, "***" if name.lower() == "password" else value) for name, value in pairs]
        rest = f"{path}?{urllib.parse.urlencode(pairs, safe='*')}"
    return f"{scheme}://{rest}"


def to_environment(settings: Settings) -> dict[str, str]:
    """Return the DRNN_* variables that make load_settings rebuild ``settings``, e.g. for a subprocess."""
    variables = {}
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        variables[ENV_PREFIX + field.name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    return variables


def unknown_environment_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """Return the DRNN_* environment variables that name no setting, such as misspellings."""
    environ = os.environ if environ is None else environ
    return sorted(name for name in environ if name.startswith(ENV_PREFIX) and name not in ENV_VARS)


def _validate_field(field: dataclasses.Field, value: Any) -> None:
    name = field.name
    source = f"--{name.replace('_', '-')} / {ENV_PREFIX}{name.upper()}"
    choices = field.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"Invalid {name}={value!r} ({source}): expected one of {', '.join(choices)}")
    low, high = field.metadata.get("low"), field.metadata.get("high")
    if low is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"Invalid {name}={value!r} ({source}): expected a number from {low} to {high}")
    if not low <= value <= high:
        raise ConfigError(f"Invalid {name}={value!r} ({source}): expected a number from {low} to {high}")


def _validate_address(name: str, value: str, *, allow_empty: bool) -> None:
    if allow_empty and value == "":
        return
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(
            f"Invalid {name}={value!r}: expected host:port, e.g. 127.0.0.1:9400 or 0.0.0.0:9400"
            + (", or an empty value to disable it" if allow_empty else "")
        )


def _validate_servers(value: str) -> None:
    servers = [server.strip() for server in value.split(",") if server.strip()]
    if not servers:
        raise ConfigError("Invalid bootstrap_servers='': expected host:port[,host:port...]")
    for server in servers:
        _validate_address("bootstrap_servers", server, allow_empty=False)


def _validate_redis_url(value: str) -> None:
    scheme = urllib.parse.urlsplit(value).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"Invalid redis_url={redact_url(value)!r}: expected a redis://, rediss:// or unix:// URL"
        )


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number"}


def _parse_value(field: dataclasses.Field, text: str, source: str) -> Any:
    kind = type(field.default)
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        raise ConfigError(
            f"Invalid {field.name}={text!r} from {source}: expected {_KIND_NAMES[kind]}"
        ) from None
    return text


def add_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """Add a ``--field-name`` flag for each setting (or the given ones) to ``parser``."""
    group = parser.add_argument_group("settings (flags override DRNN_* environment variables)")
    for field in dataclasses.fields(Settings):
        if names is not None and field.name not in names:
            continue
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{field.metadata['help']} Default: {field.default!r}. Env: {ENV_PREFIX}{field.name.upper()}."
        if isinstance(field.default, bool):
            group.add_argument(flag, dest=field.name, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(flag, dest=field.name, default=None, metavar=field.name.upper(), help=help_text)


def load_settings(
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build Settings from the environment, then CLI flags, then keyword overrides.

    A value given by a flag or an override is used without reading its
    environment variable, so an invalid variable does not block a valid flag.

    Raises
    ------
    ConfigError
        Naming the setting, where it came from, and the allowed values.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for field in dataclasses.fields(Settings):
        if field.name in overrides:
            continue

        env_name = ENV_PREFIX + field.name.upper()
        flag_value = getattr(args, field.name, None) if args is not None else None
        if flag_value is not None:
            source = "--" + field.name.replace("_", "-")
            values[field.name] = flag_value if isinstance(flag_value, bool) else _parse_value(field, flag_value, source)
        elif env_name in environ:
            values[field.name] = _parse_value(field, environ[env_name], env_name)
    values.update(overrides)
    return Settings(**values)
