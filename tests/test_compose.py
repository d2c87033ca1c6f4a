"""Wiring checks of docker-compose.yml, deploy/prometheus.yml, deploy/grafana, the Dockerfile and .dockerignore.

The files are parsed, not run: each test compares two places that must agree.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import re
import shlex
import tomllib
import urllib.parse
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_PATH = REPO_ROOT / "docker-compose.yml"
PROMETHEUS_PATH = REPO_ROOT / "deploy" / "prometheus.yml"
DOCKERFILE_PATH = REPO_ROOT / "Dockerfile"
DOCKERIGNORE_PATH = REPO_ROOT / ".dockerignore"
PYPROJECT_PATH = REPO_ROOT / "pyproject.toml"
ALERTS_PATH = REPO_ROOT / "deploy" / "alerts.yml"
GRAFANA_DIR = REPO_ROOT / "deploy" / "grafana"
GRAFANA_PROVISIONING_DIR = GRAFANA_DIR / "provisioning"
DASHBOARD_PATH = GRAFANA_DIR / "dashboards" / "drnn-stream.json"

KAFKA_SERVICE = "kafka"
KAFKA_INIT_SERVICE = "kafka-init"
REDIS_SERVICE = "redis"
WORKER_SERVICE = "worker"
PROMETHEUS_SERVICE = "prometheus"
GRAFANA_SERVICE = "grafana"
REQUIRED_SERVICES = (
    KAFKA_SERVICE,
    KAFKA_INIT_SERVICE,
    REDIS_SERVICE,
    WORKER_SERVICE,
    PROMETHEUS_SERVICE,
    GRAFANA_SERVICE,
)

SCRAPE_JOB = "drnn-worker"
SCRAPE_INTERVAL_SECONDS = 15
PROMETHEUS_CONFIG_TARGET = "/etc/prometheus/prometheus.yml"
PROMETHEUS_PORT = 9090
GRAFANA_PROVISIONING_TARGET = "/etc/grafana/provisioning"
GRAFANA_DATA_TARGET = "/var/lib/grafana"
WORKER_STOP_GRACE_SECONDS = 30

DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)")
DURATION_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


# Parsers of the files under test.


def _load_yaml(path: Path) -> dict:
    with path.open(encoding="utf-8") as stream:
        return yaml.safe_load(stream)


def _environment(service: dict) -> dict[str, str]:
    """Return a service's environment as strings, from a mapping or a KEY=VALUE list."""
    raw = service.get("environment") or {}

    if isinstance(raw, list):
        pairs = (item.partition("=") for item in raw)
        return {key: value for key, _, value in pairs}

    return {key: "" if value is None else str(value) for key, value in raw.items()}


def _split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.strip().rpartition(":")
    return host, int(port)


def _parse_listeners(value: str) -> dict[str, tuple[str, int]]:
    """Map each name in a Kafka listener list ("NAME://host:port,...") to its host and port."""
    listeners = {}

    for entry in value.split(","):
        name, _, address = entry.strip().partition("://")
        listeners[name] = _split_host_port(address)

    return listeners


def _parse_protocol_map(value: str) -> dict[str, str]:
    pairs = (entry.strip().partition(":") for entry in value.split(","))
    return {name: protocol for name, _, protocol in pairs}


def _duration_seconds(value: str | int | float) -> float:
    """Convert a Compose or Prometheus duration such as "30s" or "1m30s" to seconds."""
    if isinstance(value, (int, float)):
        return float(value)

    parts = DURATION_PART.findall(value)
    assert "".join(number + unit for number, unit in parts) == value, f"invalid duration {value!r}"
    return sum(float(number) * DURATION_UNIT_SECONDS[unit] for number, unit in parts)


def _mounts(service: dict) -> list[tuple[str, str]]:
    """Return (source, target) of each volume of a service, from short or long Compose syntax."""
    mounts = []

    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            mounts.append((volume.get("source", ""), volume["target"]))
            continue

        source, _, rest = volume.partition(":")
        target = rest.partition(":")[0]
        mounts.append((source, target))

    return mounts


def _mount_sources_by_target(service: dict) -> dict[str, str]:
    return {target: source for source, target in _mounts(service)}


def _is_named_volume(source: str) -> bool:
    return bool(source) and not source.startswith((".", "/", "~"))


def _command_args(service: dict) -> list[str]:
    command = service.get("command") or []

    if isinstance(command, str):
        return shlex.split(command)

    return [str(arg) for arg in command]


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """Split a Dockerfile into (INSTRUCTION, arguments) pairs, joining backslash continuations."""
    instructions = []
    pending = ""

    for line in text.splitlines():
        stripped = line.strip()

        if not stripped or stripped.startswith("#"):
            continue

        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue

        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""

    return instructions


def _instruction_arguments(instructions: list[tuple[str, str]], keyword: str) -> list[str]:
    return [arguments for name, arguments in instructions if name == keyword]


def _copy_sources(instructions: list[tuple[str, str]]) -> list[str]:
    """Return the build-context paths that COPY instructions read, without trailing slashes."""
    sources = []

    for arguments in _instruction_arguments(instructions, "COPY"):
        paths = [token for token in shlex.split(arguments) if not token.startswith("--")]
        sources.extend(path.rstrip("/") for path in paths[:-1])

    return sources


def _dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env = {}

    for arguments in _instruction_arguments(instructions, "ENV"):
        tokens = shlex.split(arguments)

        if "=" not in tokens[0]:
            env[tokens[0]] = " ".join(tokens[1:])
            continue

        for token in tokens:
            key, _, value = token.partition("=")
            env[key] = value

    return env


def _exposed_ports(instructions: list[tuple[str, str]]) -> set[int]:
    ports = set()

    for arguments in _instruction_arguments(instructions, "EXPOSE"):
        for port in arguments.split():
            ports.add(int(port.partition("/")[0]))

    return ports


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Decide whether .dockerignore leaves one top-level context path out of the build.

    The last matching pattern wins and "!" re-includes, as in Docker.
    NOTE: fnmatch lets "*" cross "/" and gives "**" no special meaning, so
    this matches Docker only for top-level names such as the COPY sources here.
    """
    excluded = False

    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern[1:] if negated else pattern

        if fnmatch.fnmatch(path, body.strip("/")):
            excluded = not negated

    return excluded


def _package_dirs(pyproject: dict) -> list[str]:
    """Return the top-level package directories named by [tool.setuptools.packages.find]."""
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({pattern.rstrip("*").rstrip(".") for pattern in include})


def _scrape_job(prometheus_config: dict, job_name: str) -> dict | None:
    for job in prometheus_config.get("scrape_configs") or []:
        if job.get("job_name") == job_name:
            return job

    return None


def _scrape_targets(job: dict) -> list[str]:
    targets = []

    for group in job.get("static_configs") or []:
        targets.extend(group.get("targets") or [])

    return targets


def _host_path(source: str) -> Path:
    """Resolve a bind-mount source of docker-compose.yml to a path in the repository."""
    return (COMPOSE_PATH.parent / source).resolve()


def _mounted_host_path(service: dict, container_path: str) -> Path | None:
    """Return the host path mounted at ``container_path`` in a service, through the bind mount that contains it."""
    for source, target in _mounts(service):
        if _is_named_volume(source):
            continue

        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return _host_path(source) / container_path[len(target):].lstrip("/")

    return None


def _published_ports(service: dict) -> list[str]:
    return [str(port) for port in service.get("ports") or []]


def _grafana_datasources() -> list[dict]:
    datasources = []

    for path in sorted((GRAFANA_PROVISIONING_DIR / "datasources").glob("*.y*ml")):
        datasources.extend(_load_yaml(path).get("datasources") or [])

    return datasources


def _grafana_dashboard_providers() -> list[dict]:
    providers = []

    for path in sorted((GRAFANA_PROVISIONING_DIR / "dashboards").glob("*.y*ml")):
        providers.extend(_load_yaml(path).get("providers") or [])

    return providers


def _dashboard_datasource_uids(dashboard: dict) -> set[str]:
    uids = set()

    for panel in dashboard["panels"]:
        if "datasource" in panel:
            uids.add(panel["datasource"]["uid"])

        for target in panel.get("targets") or []:
            uids.add(target["datasource"]["uid"])

    return uids


def _kafka_init_create_lines(services: dict) -> list[list[str]]:
    """Return the tokens of each `kafka-topics.sh --create` line in the kafka-init command."""
    script = "\n".join(_command_args(services[KAFKA_INIT_SERVICE]))
    lines = [shlex.split(line) for line in script.splitlines() if "kafka-topics.sh" in line]
    return [tokens for tokens in lines if "--create" in tokens]


def _option_value(tokens: list[str], option: str) -> str | None:
    if option not in tokens:
        return None

    return tokens[tokens.index(option) + 1]


# Fixtures.


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load_yaml(COMPOSE_PATH)


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def kafka_env(services: dict) -> dict[str, str]:
    return _environment(services[KAFKA_SERVICE])


@pytest.fixture(scope="module")
def worker_env(services: dict) -> dict[str, str]:
    return _environment(services[WORKER_SERVICE])


@pytest.fixture(scope="module")
def metrics_port(worker_env: dict[str, str]) -> int:
    return _split_host_port(worker_env["DRNN_METRICS_ADDRESS"])[1]


@pytest.fixture(scope="module")
def prometheus_config() -> dict:
    return _load_yaml(PROMETHEUS_PATH)


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return _dockerfile_instructions(DOCKERFILE_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with PYPROJECT_PATH.open("rb") as stream:
        return tomllib.load(stream)


@pytest.fixture(scope="module")
def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE_PATH.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


# Services and the Kafka broker.


def test_compose_services_present(services):
    for name in REQUIRED_SERVICES:
        assert name in services, f"docker-compose.yml has no service {name!r}"


def test_compose_images_pinned(services):
    for name, service in services.items():
        if "image" not in service:
            continue

        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"service {name!r} image {image!r} has no tag"
        assert tag != "latest", f"service {name!r} uses the moving tag 'latest'"


def test_compose_kafka_quorum_is_this_node(kafka_env):
    roles = {role.strip() for role in kafka_env["KAFKA_PROCESS_ROLES"].split(",")}
    voters = kafka_env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert roles == {"broker", "controller"}, f"KAFKA_PROCESS_ROLES is {roles}"
    assert len(voters) == 1, f"a single node needs one quorum voter, got {voters}"

    node_id, _, voter_address = voters[0].partition("@")
    voter_host, voter_port = _split_host_port(voter_address)
    assert node_id == kafka_env["KAFKA_NODE_ID"], f"voter id {node_id} is not KAFKA_NODE_ID"
    assert voter_host == KAFKA_SERVICE, f"voter host {voter_host!r} is not the kafka service"

    controller_name = kafka_env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    listeners = _parse_listeners(kafka_env["KAFKA_LISTENERS"])
    assert controller_name in listeners, f"{controller_name!r} is missing from KAFKA_LISTENERS"
    assert voter_port == listeners[controller_name][1], "voter port is not the controller port"


def test_compose_kafka_listeners_have_protocols(kafka_env):
    protocols = _parse_protocol_map(kafka_env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"])
    names = set(_parse_listeners(kafka_env["KAFKA_LISTENERS"]))
    names |= set(_parse_listeners(kafka_env["KAFKA_ADVERTISED_LISTENERS"]))
    names.add(kafka_env["KAFKA_INTER_BROKER_LISTENER_NAME"])

    for name in sorted(names):
        assert name in protocols, (
            f"listener {name!r} is missing from KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"
        )


def test_compose_advertised_listeners_are_bound(kafka_env):
    listeners = _parse_listeners(kafka_env["KAFKA_LISTENERS"])
    advertised = _parse_listeners(kafka_env["KAFKA_ADVERTISED_LISTENERS"])

    for name, (_, port) in advertised.items():
        assert name in listeners, f"advertised listener {name!r} is missing from KAFKA_LISTENERS"

        bound_port = listeners[name][1]
        assert bound_port == port, f"listener {name!r} binds port {bound_port}, advertises {port}"


def test_compose_kafka_single_node_replication(kafka_env):
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ):
        value = kafka_env.get(key)
        assert value == "1", f"{key} must be 1 on a single broker, got {value!r}"


def test_compose_kafka_auto_create_disabled(kafka_env):
    value = kafka_env.get("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "true")
    assert value.lower() == "false", f"KAFKA_AUTO_CREATE_TOPICS_ENABLE is {value!r}"


def test_compose_bootstrap_servers_use_advertised_listener(kafka_env, worker_env):
    advertised = _parse_listeners(kafka_env["KAFKA_ADVERTISED_LISTENERS"]).values()
    ports = {port for host, port in advertised if host == KAFKA_SERVICE}

    for server in worker_env["DRNN_BOOTSTRAP_SERVERS"].split(","):
        host, port = _split_host_port(server)
        assert host == KAFKA_SERVICE, f"bootstrap server {server!r} is not the kafka service"
        assert port in ports, f"bootstrap port {port} is not advertised for kafka: {ports}"


# The kafka-init service.


def test_compose_kafka_init_creates_worker_topics(services, worker_env):
    create_lines = _kafka_init_create_lines(services)
    topics = {_option_value(tokens, "--topic") for tokens in create_lines}
    topic = worker_env["DRNN_TOPIC"]
    dead_letter_topic = worker_env["DRNN_DEAD_LETTER_TOPIC"]
    assert topic in topics, f"kafka-init does not create DRNN_TOPIC {topic!r}"
    assert dead_letter_topic in topics, f"kafka-init does not create {dead_letter_topic!r}"

    for tokens in create_lines:
        assert "--if-not-exists" in tokens, f"kafka-init fails on a rerun: {' '.join(tokens)}"


def test_compose_kafka_init_uses_worker_bootstrap(services, worker_env):
    bootstrap = worker_env["DRNN_BOOTSTRAP_SERVERS"].split(",")
    create_lines = _kafka_init_create_lines(services)
    assert create_lines, "kafka-init runs no kafka-topics.sh --create"

    for tokens in create_lines:
        server = _option_value(tokens, "--bootstrap-server")
        assert server in bootstrap, f"kafka-init connects to {server!r}, the worker to {bootstrap}"


def test_compose_kafka_init_image_matches_kafka(services):
    init_image = services[KAFKA_INIT_SERVICE]["image"]
    kafka_image = services[KAFKA_SERVICE]["image"]
    assert init_image == kafka_image, f"kafka-init runs {init_image}, the broker {kafka_image}"


# Dependencies and health checks.


def test_compose_worker_dependency_conditions(services):
    depends_on = services[WORKER_SERVICE].get("depends_on") or {}
    expected = {
        KAFKA_SERVICE: "service_healthy",
        REDIS_SERVICE: "service_healthy",
        KAFKA_INIT_SERVICE: "service_completed_successfully",
    }

    for name, condition in expected.items():
        assert name in depends_on, f"worker does not depend on {name!r}"

        actual = depends_on[name].get("condition")
        assert actual == condition, f"worker waits for {name!r} with {actual}, not {condition}"


def test_compose_kafka_init_waits_for_kafka(services):
    depends_on = services[KAFKA_INIT_SERVICE].get("depends_on") or {}
    assert KAFKA_SERVICE in depends_on, "kafka-init does not depend on kafka"

    condition = depends_on[KAFKA_SERVICE].get("condition")
    assert condition == "service_healthy", f"kafka-init waits for kafka with {condition}"


def test_compose_healthy_dependencies_have_healthchecks(services):
    for name, service in services.items():
        depends_on = service.get("depends_on") or {}

        if isinstance(depends_on, list):
            continue

        for dependency, options in depends_on.items():
            if options.get("condition") != "service_healthy":
                continue

            healthcheck = services[dependency].get("healthcheck") or {}
            assert healthcheck.get("test"), (
                f"{name!r} waits for {dependency!r} to be healthy, which has no healthcheck"
            )


def test_compose_worker_healthcheck_uses_metrics_port(services, metrics_port):
    test_command = services[WORKER_SERVICE]["healthcheck"]["test"]
    command_text = " ".join(test_command) if isinstance(test_command, list) else test_command
    assert f":{metrics_port}/" in command_text, f"healthcheck does not probe port {metrics_port}"


def test_compose_worker_stop_grace_period(services):
    grace = services[WORKER_SERVICE].get("stop_grace_period", "10s")
    assert _duration_seconds(grace) == WORKER_STOP_GRACE_SECONDS, (
        f"worker stop_grace_period is {grace!r}, expected {WORKER_STOP_GRACE_SECONDS}s"
    )


# Redis and the worker's own settings.


def test_compose_redis_appendonly(services):
    command = " ".join(_command_args(services[REDIS_SERVICE]))
    data_source = _mount_sources_by_target(services[REDIS_SERVICE]).get("/data", "")
    assert "--appendonly yes" in command, f"redis runs without --appendonly yes: {command!r}"
    assert "--appendfsync everysec" in command, f"redis runs without appendfsync: {command!r}"
    assert _is_named_volume(data_source), "redis /data is not on a named volume"


def test_compose_redis_url_names_redis_service(worker_env):
    url = urllib.parse.urlsplit(worker_env["DRNN_REDIS_URL"])
    assert url.scheme in ("redis", "rediss"), f"DRNN_REDIS_URL scheme is {url.scheme!r}"
    assert url.hostname == REDIS_SERVICE, f"DRNN_REDIS_URL host {url.hostname!r} is not redis"


def test_compose_checkpoint_dir_on_volume(services, worker_env):
    checkpoint_dir = worker_env["DRNN_CHECKPOINT_DIR"]
    mounts = _mount_sources_by_target(services[WORKER_SERVICE])
    assert checkpoint_dir in mounts, f"DRNN_CHECKPOINT_DIR {checkpoint_dir} is not mounted"
    assert _is_named_volume(mounts[checkpoint_dir]), f"{checkpoint_dir} is not a named volume"


def test_compose_volumes_declared(compose, services):
    declared = set(compose.get("volumes") or {})

    for name, service in services.items():
        for source, _ in _mounts(service):
            if _is_named_volume(source):
                assert source in declared, f"{name!r} mounts undeclared volume {source!r}"


def test_compose_env_vars_known_to_cli(services):
    settings = importlib.import_module("streamer.settings")
    names = set()

    for service in services.values():
        names.update(key for key in _environment(service) if key.startswith("DRNN_"))

    assert names, "docker-compose.yml sets no DRNN_* variable"

    for name in sorted(names):
        assert name in settings.ENV_VARS, f"{name} is missing from streamer.settings.ENV_VARS"


def test_compose_worker_env_loads_settings(worker_env):
    settings = importlib.import_module("streamer.settings")
    loaded = settings.load_settings(environ=worker_env)
    assert loaded.checkpoint_dir == worker_env["DRNN_CHECKPOINT_DIR"], "checkpoint_dir was not read"
    assert loaded.metrics_address == worker_env["DRNN_METRICS_ADDRESS"], "metrics_address was not read"


# Prometheus.


def test_compose_metrics_port_matches_scrape_target(prometheus_config, metrics_port):
    job = _scrape_job(prometheus_config, SCRAPE_JOB)
    assert job is not None, f"prometheus.yml has no job {SCRAPE_JOB!r}"

    targets = _scrape_targets(job)
    assert targets, f"job {SCRAPE_JOB!r} has no static target"

    for target in targets:
        host, port = _split_host_port(target)
        assert host == WORKER_SERVICE, f"scrape target {target!r} is not the worker service"
        assert port == metrics_port, f"scrape port {port} is not the metrics port {metrics_port}"


def test_compose_scrape_interval_is_15s(prometheus_config):
    job = _scrape_job(prometheus_config, SCRAPE_JOB) or {}
    global_interval = (prometheus_config.get("global") or {}).get("scrape_interval", "1m")
    interval = job.get("scrape_interval", global_interval)
    assert _duration_seconds(interval) == SCRAPE_INTERVAL_SECONDS, (
        f"job {SCRAPE_JOB!r} scrapes every {interval}, expected {SCRAPE_INTERVAL_SECONDS}s"
    )


def test_compose_prometheus_mounts_config(services):
    mounts = _mount_sources_by_target(services[PROMETHEUS_SERVICE])
    assert PROMETHEUS_CONFIG_TARGET in mounts, f"nothing is mounted at {PROMETHEUS_CONFIG_TARGET}"

    source = (COMPOSE_PATH.parent / mounts[PROMETHEUS_CONFIG_TARGET]).resolve()
    assert source == PROMETHEUS_PATH.resolve(), f"prometheus mounts {source}, not {PROMETHEUS_PATH}"


def test_compose_prometheus_loads_alert_rules(prometheus_config, services):
    rule_files = prometheus_config.get("rule_files") or []
    assert rule_files, "prometheus.yml has no rule_files"

    for rule_file in rule_files:
        source = _mounted_host_path(services[PROMETHEUS_SERVICE], rule_file)
        assert source is not None, f"rule file {rule_file} is not mounted into the prometheus service"
        assert source == ALERTS_PATH.resolve(), f"rule file {rule_file} comes from {source}, not {ALERTS_PATH}"


def test_compose_prometheus_evaluates_rules_every_scrape(prometheus_config):
    global_config = prometheus_config.get("global") or {}
    interval = global_config.get("evaluation_interval", "1m")
    assert _duration_seconds(interval) == SCRAPE_INTERVAL_SECONDS, (
        f"rules are evaluated every {interval}, expected {SCRAPE_INTERVAL_SECONDS}s"
    )


def test_compose_prometheus_has_healthcheck(services):
    healthcheck = services[PROMETHEUS_SERVICE].get("healthcheck") or {}
    command = " ".join(healthcheck.get("test") or [])
    assert f":{PROMETHEUS_PORT}/-/ready" in command, f"prometheus healthcheck does not probe /-/ready: {command!r}"


# Grafana.


def test_compose_grafana_mounts_provisioning(services):
    source = _mounted_host_path(services[GRAFANA_SERVICE], GRAFANA_PROVISIONING_TARGET)
    assert source == GRAFANA_PROVISIONING_DIR.resolve(), (
        f"grafana sees {source} at {GRAFANA_PROVISIONING_TARGET}, not {GRAFANA_PROVISIONING_DIR}"
    )


def test_compose_grafana_datasource_is_prometheus_service():
    datasources = [source for source in _grafana_datasources() if source.get("type") == "prometheus"]
    assert len(datasources) == 1, f"expected one Prometheus data source, got {datasources}"

    url = urllib.parse.urlsplit(datasources[0]["url"])
    assert url.hostname == PROMETHEUS_SERVICE, f"the data source points at {url.hostname!r}"
    assert url.port == PROMETHEUS_PORT, f"the data source uses port {url.port}, not {PROMETHEUS_PORT}"


def test_compose_prometheus_publishes_datasource_port(services):
    container_ports = {port.rsplit(":", 1)[-1] for port in _published_ports(services[PROMETHEUS_SERVICE])}
    assert str(PROMETHEUS_PORT) in container_ports, f"prometheus does not publish port {PROMETHEUS_PORT}"


def test_compose_dashboard_uses_provisioned_datasource():
    provisioned = {source.get("uid") for source in _grafana_datasources()}
    dashboard = json.loads(DASHBOARD_PATH.read_text(encoding="utf-8"))
    used = _dashboard_datasource_uids(dashboard)
    assert used, "the dashboard names no data source"
    assert used <= provisioned, f"the dashboard uses data sources {used - provisioned} that are not provisioned"


def test_compose_dashboard_provider_path_is_mounted(services):
    providers = _grafana_dashboard_providers()
    assert providers, "no Grafana dashboard provider is provisioned"

    for provider in providers:
        path = provider["options"]["path"]
        source = _mounted_host_path(services[GRAFANA_SERVICE], path)
        assert source is not None, f"dashboard provider path {path} is not mounted into grafana"
        assert (source / DASHBOARD_PATH.name).resolve() == DASHBOARD_PATH.resolve(), (
            f"grafana reads dashboards from {source}, which does not hold {DASHBOARD_PATH.name}"
        )


def test_compose_grafana_home_dashboard_is_mounted(services):
    home = _environment(services[GRAFANA_SERVICE]).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home, "grafana sets no home dashboard"

    source = _mounted_host_path(services[GRAFANA_SERVICE], home)
    assert source is not None and source.resolve() == DASHBOARD_PATH.resolve(), f"home dashboard {home} is {source}"


def test_compose_grafana_waits_for_prometheus(services):
    depends_on = services[GRAFANA_SERVICE].get("depends_on") or {}
    assert PROMETHEUS_SERVICE in depends_on, "grafana does not depend on prometheus"


def test_compose_grafana_data_on_named_volume(services):
    source = _mount_sources_by_target(services[GRAFANA_SERVICE]).get(GRAFANA_DATA_TARGET, "")
    assert _is_named_volume(source), f"grafana {GRAFANA_DATA_TARGET} is not on a named volume"


def test_compose_dashboards_published_on_loopback(services):
    for name in (PROMETHEUS_SERVICE, GRAFANA_SERVICE):
        for port in _published_ports(services[name]):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port!r} beyond loopback"


# The Dockerfile and its build context.


def test_compose_worker_builds_from_dockerfile(services):
    build = services[WORKER_SERVICE].get("build")
    assert build is not None, "worker has no build section"

    if isinstance(build, str):
        build = {"context": build}

    context = build.get("context", ".")
    dockerfile = build.get("dockerfile", "Dockerfile")
    assert context == ".", f"worker builds from context {context!r}"
    assert dockerfile == "Dockerfile", f"worker builds from {dockerfile!r}"
    assert DOCKERFILE_PATH.is_file(), f"{DOCKERFILE_PATH} is missing"


def test_compose_dockerfile_copies_packages(dockerfile, pyproject):
    sources = _copy_sources(dockerfile)

    for package in _package_dirs(pyproject):
        assert package in sources, f"the Dockerfile does not COPY package {package!r}"


def test_compose_dockerfile_copies_project_metadata(dockerfile, pyproject):
    sources = _copy_sources(dockerfile)
    readme = pyproject["project"]["readme"]
    assert "pyproject.toml" in sources, "the Dockerfile does not COPY pyproject.toml"
    assert readme in sources, f"the Dockerfile does not COPY {readme}, which pip install reads"


def test_compose_dockerfile_sources_exist(dockerfile):
    for source in _copy_sources(dockerfile):
        assert (REPO_ROOT / source).exists(), f"the Dockerfile copies {source!r}, which is missing"


def test_compose_dockerignore_keeps_copied_sources(dockerfile, dockerignore_patterns):
    for source in _copy_sources(dockerfile):
        excluded = _dockerignore_excludes(dockerignore_patterns, source)
        assert not excluded, f".dockerignore excludes {source!r}, which the Dockerfile copies"


def test_compose_dockerignore_excludes_local_state(dockerignore_patterns):
    for path in (".venv", ".git", ".pytest_cache", ".hypothesis", "checkpoints", "data"):
        excluded = _dockerignore_excludes(dockerignore_patterns, path)
        assert excluded, f".dockerignore does not exclude {path!r}"


def test_compose_dockerfile_entrypoint_is_console_script(dockerfile, pyproject, services):
    entrypoints = _instruction_arguments(dockerfile, "ENTRYPOINT")
    commands = _instruction_arguments(dockerfile, "CMD")
    assert entrypoints, "the Dockerfile has no ENTRYPOINT"
    assert commands, "the Dockerfile has no CMD"

    scripts = sorted(pyproject["project"]["scripts"])
    entrypoint = json.loads(entrypoints[-1])
    command = json.loads(commands[-1])
    service_command = _command_args(services[WORKER_SERVICE])
    assert entrypoint[0] in scripts, f"ENTRYPOINT {entrypoint[0]!r} is not in {scripts}"
    assert command == ["worker"], f"CMD is {command}, expected ['worker']"
    assert service_command in ([], command), f"the worker service runs {service_command}"


def test_compose_dockerfile_runs_as_non_root(dockerfile):
    users = _instruction_arguments(dockerfile, "USER")
    assert users, "the Dockerfile has no USER, so the worker runs as root"

    user = users[-1].partition(":")[0]
    assert user not in ("root", "0"), f"the final USER is {user!r}"


def test_compose_dockerfile_prepares_writable_dirs(dockerfile, worker_env):
    env = _dockerfile_env(dockerfile)
    runs = " ".join(_instruction_arguments(dockerfile, "RUN"))
    checkpoint_dir = worker_env["DRNN_CHECKPOINT_DIR"]
    assert "NUMBA_CACHE_DIR" in env, "the Dockerfile does not set NUMBA_CACHE_DIR"
    assert env["NUMBA_CACHE_DIR"] in runs, "no RUN creates the NUMBA_CACHE_DIR directory"
    assert checkpoint_dir in runs, f"no RUN creates {checkpoint_dir} for the volume"
    assert "chown" in runs, "no RUN gives the non-root user its directories"


def test_compose_dockerfile_exposes_metrics_port(dockerfile, metrics_port):
    exposed = _exposed_ports(dockerfile)
    assert metrics_port in exposed, f"the Dockerfile does not EXPOSE metrics port {metrics_port}"
