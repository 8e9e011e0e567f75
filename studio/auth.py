"""Slow down password guessing: each client (by address) gets a few free wrong logins, then must wait
longer after every further one (1 s, 2 s, 4 s, ... up to a minute) before the server looks at its next try.

Gradio checks the password itself and gives the checker no client, so the throttle is an ASGI middleware
in front of the login route: a client that is waiting gets 429 with Retry-After (its password is not even
checked). Every try is counted as a failure before the password is looked at (`attempt`), and a right
password (the login route's 2xx) clears the count afterwards: 200 wrong passwords sent at once are not all
checked, only the free ones and one more, the rest wait like sequential ones.

Clients are told apart by the connection's address, after uvicorn's proxy-headers step: a proxy it trusts
(`FORWARDED_ALLOW_IPS`, by default 127.0.0.1 and ::1) has its X-Forwarded-For address used instead. Behind a
proxy on another host that is not listed there, every client has the proxy's address and they share one count:
one guesser slows everyone's login down.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

FREE_FAILURES = 3
FIRST_DELAY_S, MAX_DELAY_S = 1.0, 60.0
MAX_CLIENTS = 10_000  # clients remembered; the oldest is forgotten first
LOGIN_PATHS = ("/login", "/login/")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class LoginThrottle:
    """Failure counts per client and when each may try again. Thread-safe; `clock` is for tests."""

    def __init__(self, free: int = FREE_FAILURES, first_delay: float = FIRST_DELAY_S,
                 max_delay: float = MAX_DELAY_S, clock: Callable[[], float] = time.monotonic):
        self.free, self.first_delay, self.max_delay, self.clock = free, first_delay, max_delay, clock
        self._clients: OrderedDict[str, tuple[int, float]] = OrderedDict()  # client -> (failures, next try)
        self._lock = threading.Lock()

    def wait_s(self, client: str) -> float:
        """Seconds `client` must still wait before its next login is looked at (0: it may try now)."""
        with self._lock:
            _, next_try = self._clients.get(client, (0, 0.0))
        return max(0.0, next_try - self.clock())

    def attempt(self, client: str) -> float:
        """Count a try by `client` as a failure now, before its password is checked, and 0; or, while it must
        wait, the seconds left (the try is not counted and must not be checked). Check and count are one step
        under the lock, so concurrent tries cannot all pass the check before any of them is counted."""
        with self._lock:
            _, next_try = self._clients.get(client, (0, 0.0))
            wait = next_try - self.clock()
            if wait > 0:
                return wait
            self._count(client)
        return 0.0

    def failed(self, client: str) -> None:
        with self._lock:
            self._count(client)

    def _count(self, client: str) -> None:
        """One more failure for `client` (the caller holds the lock)."""
        failures = self._clients.pop(client, (0, 0.0))[0] + 1
        over = failures - self.free
        delay = min(self.max_delay, self.first_delay * 2 ** (over - 1)) if over > 0 else 0.0
        self._clients[client] = (failures, self.clock() + delay)
        while len(self._clients) > MAX_CLIENTS:
            self._clients.popitem(last=False)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._clients.pop(client, None)


class ThrottledLogin:
    """ASGI middleware: the throttle in front of POST /login (under any root path)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], throttle: LoginThrottle | None = None):
        self.app = app
        self.throttle = throttle or LoginThrottle()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or not scope.get("path", "").endswith(
                LOGIN_PATHS):
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("unknown",))[0]
        wait = self.throttle.attempt(client)  # counted as wrong until the route says it was right
        if wait > 0:
            await _too_many(send, wait)
            return
        status: list[int] = []

        async def watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self.app(scope, receive, watch)
        if status and 200 <= status[0] < 300:
            self.throttle.succeeded(client)


async def _too_many(send: Send, wait: float) -> None:
    seconds = max(1, round(wait + 0.499))
    body = json.dumps({"detail": f"Too many wrong logins from this address; try again in {seconds} s."}).encode()
    await send({"type": "http.response.start", "status": 429,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", str(seconds).encode()),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def middleware(throttle: LoginThrottle | None = None) -> Any:
    """The starlette Middleware entry for FastAPI(middleware=[...]) (gradio's launch(app_kwargs=...))."""
    from starlette.middleware import Middleware

    return Middleware(ThrottledLogin, throttle=throttle)
