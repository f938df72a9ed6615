"""The real-time stream, kept alive across every disconnect.

One background task owns the WebSocket: it connects, (re)subscribes every open
subscription, reads, and hands each message to its subscription's queue; when
the connection ends for any reason it reports it, waits a backoff and connects
again. Another task replaces the token on the live connection (TokenRefresh)
before it expires. Level2 books are kept on the consumer's side of each queue,
so a book restarts exactly where the reconnect happened in the message order.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from caspian_client.backoff import Backoff
from caspian_client.book import BookKeeper, Level2Update
from caspian_client.errors import (
    CLOSE_CODES,
    AuthenticationError,
    CaspianError,
    HTTPError,
    ProtocolError,
    RequestTimeout,
    ServiceUnavailable,
    StreamClosed,
    SubscriptionError,
    TokenRefreshError,
    UnsubscribeError,
    meaning,
)
from caspian_client.models import Level1, Level2Message, dumps, loads

if TYPE_CHECKING:
    from caspian_client.client import Client

#: A connection up this long (seconds) counts as a success for the backoff.
STABLE_S = 10.0

# -- events -------------------------------------------------------------------


@dataclass(frozen=True)
class Connected:
    """A connection is up; ``reconnect`` is False only for the first one."""

    url: str
    reconnect: bool


@dataclass(frozen=True)
class Disconnected:
    """The connection ended: the close ``code`` and its documented ``meaning`` (1006 for
    a connection lost without a close frame), and the server's ``reason``."""

    code: int
    meaning: str
    reason: str


@dataclass(frozen=True)
class Reconnecting:
    """The next attempt comes after ``delay`` seconds; ``error`` says why the last one
    failed (None after a connection that had been up)."""

    attempt: int
    delay: float
    error: str | None


@dataclass(frozen=True)
class TokenRefreshed:
    """The live connection now runs on a new token."""


@dataclass(frozen=True)
class StatusChanged:
    """A subscription's ``bboStream``, ``tradeStream`` or ``depthStream`` changed."""

    symbol: str
    request_id: str
    stream: str
    status: str


@dataclass(frozen=True)
class Lapsed:
    """A Level2 consumer fell more than its buffer behind: its book restarts from the
    next whole top-N once it reads on."""

    symbol: str


@dataclass(frozen=True)
class ServerProblem:
    """Something the server said that belongs to no request: a ProtocolError, a
    refused TokenRefresh, or a message of a type this client does not know."""

    error: CaspianError | None
    raw: dict[str, Any]


Event = (
    Connected
    | Disconnected
    | Reconnecting
    | TokenRefreshed
    | StatusChanged
    | Lapsed
    | ServerProblem
)

# -- subscriptions --------------------------------------------------------------


class _Restart:
    """Queue marker: what follows belongs to a new Subscribe (after a reconnect, or
    after the consumer fell behind)."""


_RESTART = _Restart()
_END = object()


class Subscription:
    """One subscription, kept across reconnects until closed; iterate it with
    ``async for``. Each Subscribe sent for it has a new requestId (``request_id`` is
    the current one), so that nothing of an earlier one can be taken for its data."""

    kind = ""

    def __init__(
        self,
        stream: Stream,
        symbol: str,
        symbol_type: str | None,
        levels: int | None,
        conflation: str | None,
        buffer: int,
    ) -> None:
        self.stream = stream
        self.symbol = symbol
        self.request_id = ""
        self.payload: dict[str, Any] = {"symbol": symbol, "type": self.kind}
        if symbol_type is not None:
            self.payload["symbolType"] = symbol_type
        if levels is not None:
            self.payload["numberOfLevels"] = levels
        if conflation is not None:
            self.payload["conflation"] = conflation
        # Bounded, and never waited on by the reader: a consumer that is behind must
        # not stop the connection (pings, token refresh, the other subscriptions).
        self.queue: asyncio.Queue[Any] = asyncio.Queue(buffer)
        self.statuses: dict[str, str] = {}
        self.answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        #: The requestId the server last answered 200.
        self.answered_id = ""
        #: Dropped for a consumer that fell behind; subscribed again when it reads on.
        self.lapsed = False

    def __aiter__(self) -> Self:
        return self

    async def subscribed(self) -> None:
        """Waits for the first SubscribeResponse 200; raises SubscriptionError (or
        RequestTimeout) if the Subscribe was refused (or not answered in time)."""
        await asyncio.shield(self.answered)

    async def _next_item(self) -> Any:
        if self.closed and self.queue.empty():
            raise StopAsyncIteration
        item = await self.queue.get()
        if item is _END:
            self.closed = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.closed = True
            raise item
        return item

    async def close(self) -> None:
        """Unsubscribes (waiting for the answer when connected) and ends the iterator."""
        await self.stream._unsubscribe(self)

    def _deliver(self, message: dict[str, Any]) -> None:
        raise NotImplementedError

    def _fail(self, error: BaseException) -> None:
        if not self.answered.done():
            self.answered.set_exception(error)
            # Retrieved here, so that an error nobody awaited through subscribed()
            # (it is raised by the iterator) is not reported as never retrieved.
            self.answered.exception()
        self._put_nowait(error)

    def _put_nowait(self, item: Any) -> None:
        """Puts ``item``, dropping the oldest unread items to make room."""
        while True:
            try:
                self.queue.put_nowait(item)
                return
            except asyncio.QueueFull:
                self.queue.get_nowait()


class Level1Subscription(Subscription):
    """Yields the merged current Level1 state after each update. A consumer that is
    behind skips states, never fields: each state holds everything known so far."""

    kind = "Level1"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.state = Level1(self.symbol)

    def _deliver(self, message: dict[str, Any]) -> None:
        self.state = self.state.merge(message)
        self._put_nowait(self.state)

    async def __anext__(self) -> Level1:
        while True:
            item = await self._next_item()
            if isinstance(item, Level1):
                return item


class Level2Subscription(Subscription):
    """Yields a ``Level2Update`` (the maintained book and the change) after each update,
    from the first whole top-N on; after each reconnect, from the next whole top-N.

    A consumer more than ``buffer`` messages behind cannot get every change: its
    subscription is then dropped on the server, and subscribed again when it reads
    on, so that its book restarts from a whole top-N (a ``Lapsed`` event says so).
    """

    kind = "Level2"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.keeper = BookKeeper(self.symbol)

    def _deliver(self, message: dict[str, Any]) -> None:
        if self.lapsed:
            return
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.stream._lapse(self)

    async def __anext__(self) -> Level2Update:
        while True:
            item = await self._next_item()
            if isinstance(item, _Restart):
                self.keeper.restart()
                if self.lapsed:
                    self.stream._resume(self)
                continue
            update = self.keeper.apply(Level2Message.parse(item))
            if update is not None:
                return update


# -- the stream -------------------------------------------------------------------


class Stream:
    """The client's stream. ``async with client.stream() as stream:``, then
    ``stream.level1(...)`` / ``stream.level2(...)`` and ``stream.events()``.

    Options: ``request_timeout`` (seconds for any answer, default the client's
    timeout), ``buffer`` (messages held per subscription for a consumer that is
    behind), ``backoff`` (a ``Backoff``), ``ping_interval`` (this client's own
    pings, to notice a dead network; the server's pings are always answered),
    ``connect_timeout`` (how long entering the stream waits for a first connection).
    """

    def __init__(
        self,
        client: Client,
        *,
        request_timeout: float | None = None,
        buffer: int = 10_000,
        backoff: Backoff | None = None,
        ping_interval: float | None = 20.0,
        connect_timeout: float = 30.0,
    ) -> None:
        self.client = client
        self.request_timeout = request_timeout if request_timeout is not None else client.timeout
        self.buffer = buffer
        self.backoff = backoff or Backoff()
        self.ping_interval = ping_interval
        self.connect_timeout = connect_timeout
        # Every open subscription (in order), and each by its current requestId.
        self._all: dict[Subscription, None] = {}
        self._by_id: dict[str, Subscription] = {}
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: list[asyncio.Queue[Event | None]] = []
        self._ws: ClientConnection | None = None
        self._connection = 0
        self._first: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._timers: set[asyncio.Task[None]] = set()
        #: Connections made so far (1 once connected, more after reconnects).
        self.connections = 0

    @property
    def connected(self) -> bool:
        return self._ws is not None

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        self._first = loop.create_future()
        self._task = asyncio.create_task(self._run(), name="caspian-stream")
        try:
            await asyncio.wait_for(asyncio.shield(self._first), self.connect_timeout)
        except TimeoutError:
            await self.aclose()
            raise RequestTimeout("connecting to the stream", self.connect_timeout) from None
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Closes the connection and ends every subscription and event iterator."""
        self._closing = True
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for timer in list(self._timers):
            timer.cancel()
        for subscription in list(self._all):
            subscription._put_nowait(_END)
        self._all.clear()
        self._by_id.clear()
        for listener in self._listeners:
            _offer(listener, None)

    # -- the user's side ---------------------------------------------------

    def level1(
        self, symbol: str, *, symbol_type: str | None = None, conflation: str | None = None
    ) -> Level1Subscription:
        """Subscribes to ``symbol``'s Level1; iterate the result for its merged state."""
        subscription = Level1Subscription(self, symbol, symbol_type, None, conflation, self.buffer)
        self._add(subscription)
        return subscription

    def level2(
        self,
        symbol: str,
        *,
        levels: int | None = None,
        symbol_type: str | None = None,
        conflation: str | None = None,
    ) -> Level2Subscription:
        """Subscribes to ``symbol``'s Level2 (``levels``: numberOfLevels, server default
        20); iterate the result for the maintained book."""
        subscription = Level2Subscription(
            self, symbol, symbol_type, levels, conflation, self.buffer
        )
        self._add(subscription)
        return subscription

    async def events(self) -> AsyncIterator[Event]:
        """Connection and stream-status events from now on, until the stream closes."""
        queue: asyncio.Queue[Event | None] = asyncio.Queue(10_000)
        self._listeners.append(queue)
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._listeners.remove(queue)

    # -- internals ---------------------------------------------------------

    def _emit(self, event: Event) -> None:
        for listener in self._listeners:
            _offer(listener, event)

    def _add(self, subscription: Subscription) -> None:
        if self._closing:
            raise StreamClosed(None, "the stream is closed")
        self._all[subscription] = None
        if self._ws is not None:
            self._spawn(self._send_subscribe(self._ws, self._connection, subscription))

    def _spawn(self, coroutine: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coroutine)
        self._timers.add(task)
        task.add_done_callback(self._timers.discard)

    def _lapse(self, subscription: Level2Subscription) -> None:
        subscription.lapsed = True
        self._by_id.pop(subscription.request_id, None)
        while not subscription.queue.empty():
            subscription.queue.get_nowait()
        subscription.queue.put_nowait(_RESTART)
        self._emit(Lapsed(subscription.symbol))
        ws = self._ws
        if ws is not None and subscription.answered_id == subscription.request_id:
            self._spawn(self._forget(ws, subscription.request_id))
        # Nothing left on the server for close() to end.
        subscription.answered_id = ""

    async def _forget(self, ws: ClientConnection, request_id: str) -> None:
        # The answer changes nothing: a later Subscribe has a new requestId anyway.
        with contextlib.suppress(CaspianError, ConnectionClosed):
            await self._request(ws, "Unsubscribe", {"subscribeRequestId": request_id})

    def _resume(self, subscription: Level2Subscription) -> None:
        subscription.lapsed = False
        if self._ws is not None and subscription in self._all:
            self._spawn(self._send_subscribe(self._ws, self._connection, subscription))

    async def _send_subscribe(
        self, ws: ClientConnection, connection: int, subscription: Subscription
    ) -> None:
        if subscription.request_id:
            # Everything before this point belongs to an earlier Subscribe.
            self._by_id.pop(subscription.request_id, None)
            if isinstance(subscription, Level2Subscription) and not subscription.lapsed:
                subscription._put_nowait(_RESTART)
        request_id = subscription.request_id = str(uuid.uuid4())
        self._by_id[request_id] = subscription
        message = {"requestId": request_id, "type": "Subscribe"}
        try:
            await ws.send(dumps(message | {"payload": subscription.payload}))
        except ConnectionClosed:
            return  # the reconnect sends it again
        await asyncio.sleep(self.request_timeout)
        if (
            subscription.answered_id != request_id
            and subscription.request_id == request_id
            and self._connection == connection
            and subscription in self._all
        ):
            self._drop(subscription)
            error = RequestTimeout(f"Subscribe {subscription.symbol}", self.request_timeout)
            subscription._fail(error)

    def _drop(self, subscription: Subscription) -> None:
        self._all.pop(subscription, None)
        self._by_id.pop(subscription.request_id, None)

    async def _request(
        self, ws: ClientConnection, kind: str, payload: dict[str, Any]
    ) -> dict[str, Any]:
        request_id = str(uuid.uuid4())
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = answer
        try:
            await ws.send(dumps({"requestId": request_id, "type": kind, "payload": payload}))
            return await asyncio.wait_for(answer, self.request_timeout)
        except TimeoutError:
            raise RequestTimeout(kind, self.request_timeout) from None
        finally:
            self._pending.pop(request_id, None)

    async def _unsubscribe(self, subscription: Subscription) -> None:
        if subscription not in self._all:
            return
        self._drop(subscription)
        ws = self._ws
        try:
            if ws is not None and subscription.answered_id == subscription.request_id:
                payload = {"subscribeRequestId": subscription.request_id}
                answer = await self._request(ws, "Unsubscribe", payload)
                code = _code(answer)
                if code != 300:
                    raise UnsubscribeError(code, _message(answer))
        except ConnectionClosed:
            pass  # gone with the connection: nothing to end on the server
        finally:
            subscription._put_nowait(_END)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        error: str | None = None
        while not self._closing:
            retry_after = 0.0
            try:
                token = await self.client.token()
                # The REST side may log in again meanwhile: the connection keeps its own.
                refresh_in = self.client.refresh_due_in()
                ws = await connect(
                    self.client.stream_url,
                    additional_headers={"Authorization": token},
                    ping_interval=self.ping_interval,
                    ping_timeout=self.ping_interval,
                    open_timeout=self.request_timeout,
                    max_size=2**24,
                    ssl=_ssl(self.client.stream_url, self.client.verify),
                )
            except AuthenticationError as exc:
                # The key or user was refused: no retry can help.
                self._end(StreamClosed(exc.code, f"the login was refused: {exc}"))
                return
            except ServiceUnavailable as exc:
                retry_after, error = exc.retry_after or 0.0, str(exc)
            except InvalidStatus as exc:
                header = exc.response.headers.get("Retry-After")
                retry_after = float(header) if header and header.isdigit() else 0.0
                error = f"HTTP {exc.response.status_code}"
            except (OSError, TimeoutError, WebSocketException, HTTPError, httpx.HTTPError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            else:
                error = None
                due = None if refresh_in is None else loop.time() + refresh_in
                await self._serve(ws, due)
                if self._closing:
                    return
            delay = self.backoff.next_delay(retry_after)
            self._emit(Reconnecting(self.backoff.attempt, delay, error))
            await asyncio.sleep(delay)

    def _end(self, error: CaspianError) -> None:
        self._closing = True
        if self._first is not None and not self._first.done():
            self._first.set_exception(error)
        for subscription in list(self._all):
            subscription._fail(error)
        self._all.clear()
        self._by_id.clear()
        for listener in self._listeners:
            _offer(listener, None)

    async def _serve(self, ws: ClientConnection, token_due: float | None) -> None:
        self._connection += 1
        connection = self._connection
        opened = asyncio.get_running_loop().time()
        self._ws = ws
        self.connections += 1
        self._emit(Connected(self.client.stream_url, reconnect=connection > 1))
        if self._first is not None and not self._first.done():
            self._first.set_result(None)
        for subscription in list(self._all):
            if isinstance(subscription, Level2Subscription) and subscription.lapsed:
                continue  # subscribed again when its consumer reads on
            self._spawn(self._send_subscribe(ws, connection, subscription))
        refresher = asyncio.create_task(self._refresh_tokens(ws, token_due))
        try:
            async for raw in ws:
                self._dispatch(raw)
        except ConnectionClosed:
            pass
        finally:
            refresher.cancel()
            self._ws = None
            for answer in self._pending.values():
                if not answer.done():
                    answer.set_exception(
                        ConnectionClosed(ws.protocol.close_rcvd, ws.protocol.close_sent)
                    )
        if asyncio.get_running_loop().time() - opened >= STABLE_S:
            # Only a connection that held resets the backoff: one closed again right
            # after each connect keeps the delays growing.
            self.backoff.reset()
        rcvd = ws.protocol.close_rcvd
        code = rcvd.code if rcvd is not None else 1006
        reason = rcvd.reason if rcvd is not None else ""
        if self._closing:
            return
        self._emit(Disconnected(code, meaning(CLOSE_CODES, code), reason))
        if code in (3000, 3001, 3002):
            # The token was refused: the next connection logs in afresh, and a login
            # refused then (a revoked key) ends the stream instead of looping.
            self.client.forget_token()

    def _dispatch(self, raw: str | bytes) -> None:
        try:
            message = loads(raw)
        except ValueError:
            self._emit(ServerProblem(None, {"unparsed": raw}))
            return
        if not isinstance(message, dict):
            self._emit(ServerProblem(None, {"unparsed": message}))
            return
        kind = message.get("type")
        request_id = message.get("requestId")
        subscription = self._by_id.get(request_id) if isinstance(request_id, str) else None
        if kind in ("Level1", "Level2") and subscription is not None:
            self._statuses(subscription, message)
            subscription._deliver(message)
        elif kind == "SubscribeResponse" and subscription is not None:
            code = _code(message)
            if code == 200:
                subscription.answered_id = subscription.request_id
                if not subscription.answered.done():
                    subscription.answered.set_result(None)
            else:
                self._drop(subscription)
                subscription._fail(SubscriptionError(code, _message(message)))
        elif isinstance(request_id, str) and request_id in self._pending:
            answer = self._pending[request_id]
            if not answer.done():
                answer.set_result(message)
        elif kind == "ProtocolError":
            self._emit(ServerProblem(ProtocolError(_code(message), _message(message)), message))
        elif kind not in ("Level1", "Level2", "SubscribeResponse"):
            self._emit(ServerProblem(None, message))

    def _statuses(self, subscription: Subscription, message: dict[str, Any]) -> None:
        for name in ("bboStream", "tradeStream", "depthStream"):
            status = message.get(name)
            if isinstance(status, str) and subscription.statuses.get(name) != status:
                subscription.statuses[name] = status
                self._emit(
                    StatusChanged(subscription.symbol, subscription.request_id, name, status)
                )

    async def _refresh_tokens(self, ws: ClientConnection, due: float | None) -> None:
        """Replaces the connection's token before it expires, for as long as it is up.
        ``due`` is when (loop time) the token the connection runs on should be
        replaced; None when the server did not say when tokens expire."""
        loop = asyncio.get_running_loop()
        retry = Backoff(initial=1.0, maximum=30.0)
        while due is not None:
            await asyncio.sleep(max(0.0, due - loop.time()))
            try:
                token = await self.client.token(fresh=True)
                next_due = self.client.refresh_due_in()
                answer = await self._request(ws, "TokenRefresh", {"accessToken": token})
            except ConnectionClosed:
                return
            except (CaspianError, httpx.HTTPError) as exc:
                # Tried again until the token runs out; then the server closes 3002 and
                # the reconnect logs in afresh.
                error = exc if isinstance(exc, CaspianError) else None
                self._emit(ServerProblem(error, {"TokenRefresh": str(exc)}))
                due = loop.time() + retry.next_delay()
                continue
            code = _code(answer)
            if code == 200:
                retry.reset()
                self._emit(TokenRefreshed())
                due = None if next_due is None else loop.time() + next_due
            else:
                self._emit(ServerProblem(TokenRefreshError(code, _message(answer)), answer))
                due = loop.time() + retry.next_delay()


def _offer(queue: asyncio.Queue[Any], item: Any) -> None:
    # An event listener that does not read loses its oldest events, never the stream.
    with contextlib.suppress(asyncio.QueueEmpty):
        if queue.full():
            queue.get_nowait()
    queue.put_nowait(item)


def _code(message: dict[str, Any]) -> int:
    payload = message.get("payload")
    code = payload.get("code") if isinstance(payload, dict) else None
    return code if isinstance(code, int) else -1


def _message(message: dict[str, Any]) -> str:
    payload = message.get("payload")
    return str(payload.get("message", "")) if isinstance(payload, dict) else ""


def _ssl(url: str, verify: bool | str) -> ssl.SSLContext | None:
    if not url.startswith("wss:"):
        return None
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
