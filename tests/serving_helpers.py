"""A real uvicorn server on 127.0.0.1 (a free port) in a thread of the test process, stopped by the test."""

from __future__ import annotations

import socket
import threading
import time

import httpx

START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RunningServer:
    def __init__(self, app, api_key: str | None = None):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, **{"timeout": 60, **kwargs})

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the server did not stop"

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def slow_decoding(monkeypatch, seconds: float) -> list[int]:
    """Make every decode step of the engine take `seconds` longer (so that a generation surely still runs when
    the test acts); returns a list that grows by one per step."""
    from softprompt_cli.model import lm

    decode_step, steps = lm.decode_step, []

    def slow_step(*args):
        steps.append(1)
        time.sleep(seconds)
        return decode_step(*args)

    monkeypatch.setattr(lm, "decode_step", slow_step)
    return steps
