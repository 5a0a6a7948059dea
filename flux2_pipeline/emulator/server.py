"""Serving the emulator: in a background thread (`EmulatorServer`) or in the foreground.

>>> with EmulatorServer(EmulatorConfig(port=0, latency=0.1)) as emulator:
...     httpx.get(f"{emulator.base_url}/samples/cat.png").status_code
200
"""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette

from flux2_pipeline.emulator.app import _install_log_filter, create_app
from flux2_pipeline.emulator.state import EmulatorConfig, EmulatorState

__all__ = ["EmulatorServer", "run_emulator"]


def _uvicorn_config(app: Starlette, config: EmulatorConfig, **extra: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        ws="none",
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=2,
        # uvicorn's type says int; it only hands the value to loop.call_later.
        timeout_keep_alive=config.keep_alive,  # type: ignore[arg-type]
        **extra,
    )


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def _base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class EmulatorServer:
    """The emulator on a loopback port in a background thread, as a context manager.

    Port 0 (the default here) picks a free port; `base_url` tells which. `state`
    gives the live `Faults` and `Counters`.

    Example::

        >>> with EmulatorServer(EmulatorConfig(port=0, fault_429=0.2, seed=1)) as emulator:
        ...     run_client_against(emulator.base_url)
        ...     emulator.state.counters.rejected_429
        3
    """

    def __init__(self, config: EmulatorConfig | None = None, *, startup_timeout: float = 10.0):
        self.config = config if config is not None else EmulatorConfig(port=0)
        self.app = create_app(self.config)
        self._startup_timeout = startup_timeout
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._base_url: str | None = None

    @property
    def state(self) -> EmulatorState:
        """The live queue, faults and counters."""
        state: EmulatorState = self.app.state.emulator
        return state

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:PORT` of the running server."""
        if self._base_url is None:
            raise RuntimeError("the emulator is not running; use it as a context manager")
        return self._base_url

    def start(self) -> None:
        """Bind, start serving in a thread, and return once connections are accepted."""
        if self._thread is not None:
            raise RuntimeError("the emulator is already running")
        sock = _bind(self.config.host, self.config.port)
        # log_config=None: an embedded server must not reconfigure the host's logging.
        server = uvicorn.Server(_uvicorn_config(self.app, self.config, log_config=None))
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="flux2-emulator", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                thread.join(5)
                sock.close()
                raise RuntimeError("the emulator did not start")
            time.sleep(0.005)
        self._server, self._thread = server, thread
        self._base_url = _base_url(sock)

    def stop(self) -> None:
        """Shut down gracefully (running jobs are abandoned) and join the thread."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(10)
        if thread.is_alive():
            server.force_exit = True
            thread.join(5)
        self._server = self._thread = None
        self._base_url = None

    def __enter__(self) -> EmulatorServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def run_emulator(
    config: EmulatorConfig | None = None,
    *,
    announce: Callable[[str], object] | None = print,
) -> None:
    """Serve the emulator in the foreground until interrupted (Ctrl+C stops it cleanly).

    `announce` receives one line with the base URL once the port is bound.

    Example::

        >>> run_emulator(EmulatorConfig(port=8188, latency=2.0, fault_429=0.05))
        RunComfy emulator listening on http://127.0.0.1:8188
    """
    config = config if config is not None else EmulatorConfig()
    app = create_app(config)
    sock = _bind(config.host, config.port)
    try:
        server = uvicorn.Server(_uvicorn_config(app, config))
        _install_log_filter()
        if announce is not None:
            announce(f"RunComfy emulator listening on {_base_url(sock)}")
        server.run(sockets=[sock])
    finally:
        sock.close()
