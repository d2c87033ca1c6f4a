"""A TCP proxy on 127.0.0.1 that a test can cut and restore, to make a server unreachable on demand."""

from __future__ import annotations

import logging
import socket
import struct
import threading

__all__ = ["TcpProxy"]

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
CHUNK_BYTES = 64 * 1024
CUT_MODES = ("refuse", "blackhole")


class TcpProxy:
    """Forwards every connection to its listening port on to ``target_port``, until cut.

    ``cut()`` resets every open connection in both directions. New
    connections are then refused or blackholed. In mode "refuse" the listening
    socket is closed, so connect() fails with ECONNREFUSED. In mode
    "blackhole" they are accepted but nothing is forwarded, as behind a
    dropped route. ``restore()`` resets the blackholed connections, listens
    again on the same port and forwards again.

    Parameters
    ----------
    target_port : int
        Port of the server on 127.0.0.1.
    listen_port : int
        Port to listen on; 0 picks a free one, read it from ``port``.
    """

    def __init__(self, target_port: int, *, listen_port: int = 0) -> None:
        self.target_port = target_port
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._blackholed: set[socket.socket] = set()
        self._mode: str | None = None
        self._closed = False
        self._listener = self._listen(listen_port)
        self.port = self._listener.getsockname()[1]
        self._accept_thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        """The proxy's "127.0.0.1:PORT", the address clients connect to."""
        return f"{HOST}:{self.port}"

    @property
    def accepted_while_cut(self) -> int:
        """Connections accepted and held in blackhole mode since the last restore."""
        with self._lock:
            return len(self._blackholed)

    def start(self) -> "TcpProxy":
        """Start accepting and forwarding connections; return self."""
        self._start_accepting()
        logger.info("TCP proxy %s forwards to %s:%d", self.address, HOST, self.target_port)
        return self

    def cut(self, mode: str = "refuse") -> int:
        """Reset every open connection, then refuse or blackhole new ones until ``restore()``.

        Returns the number of connections reset.
        """
        if mode not in CUT_MODES:
            raise ValueError(f"Invalid cut mode {mode!r}: expected one of {', '.join(CUT_MODES)}")

        with self._lock:
            self._mode = mode
            open_connections = list(self._connections)
            self._connections.clear()
        if mode == "refuse":
            self._stop_accepting()
        for connection in open_connections:
            _reset(connection)
        logger.info("TCP proxy %s cut (%s), %d connections reset", self.address, mode, len(open_connections))
        return len(open_connections)

    def restore(self) -> None:
        """Forward again: close the blackholed connections and accept on the same port."""
        with self._lock:
            mode, self._mode = self._mode, None
            blackholed = list(self._blackholed)
            self._blackholed.clear()
        for connection in blackholed:
            _reset(connection)
        if mode == "refuse":
            self._listener = self._listen(self.port)
            self._start_accepting()
        logger.info("TCP proxy %s restored, %d blackholed connections reset", self.address, len(blackholed))

    def close(self) -> None:
        """Stop the proxy and reset every connection."""
        with self._lock:
            self._closed = True
            connections = list(self._connections | self._blackholed)
            self._connections.clear()
            self._blackholed.clear()
        self._stop_accepting()
        for connection in connections:
            _reset(connection)

    def __enter__(self) -> "TcpProxy":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _listen(self, port: int) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, port))
        listener.listen(64)
        return listener

    def _start_accepting(self) -> None:
        listener = self._listener
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(listener,), name=f"tcp-proxy-{self.port}", daemon=True
        )
        self._accept_thread.start()

    def _stop_accepting(self) -> None:
        listener = self._listener
        try:
            listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        listener.close()
        if self._accept_thread is not None and self._accept_thread is not threading.current_thread():
            self._accept_thread.join(timeout=5.0)

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    _reset(client)
                    return
                if self._mode == "blackhole":
                    self._blackholed.add(client)
                    continue
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection((HOST, self.target_port), timeout=5.0)
        except OSError as error:
            logger.info("TCP proxy %s cannot reach %s:%d: %s", self.address, HOST, self.target_port, error)
            _reset(client)
            return
        upstream.settimeout(None)

        with self._lock:
            if self._mode is not None or self._closed:
                _reset(client)
                _reset(upstream)
                return
            self._connections.update((client, upstream))
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Copy bytes from source to sink until either side closes, then reset both."""
        try:
            while True:
                data = source.recv(CHUNK_BYTES)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._connections.discard(source)
            self._connections.discard(sink)
        _reset(source)
        _reset(sink)


def _reset(connection: socket.socket) -> None:
    """Close a socket with RST (SO_LINGER 0) and wake any thread blocked on it."""
    try:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    connection.close()
