"""supervisor.upstream against real sockets: aiohttp servers and byte-exact raw ones.

Every scenario runs on both the stock asyncio loop and uvloop (the daemon's loop), each in
its own `asyncio.Runner`, so transports of both kinds are exercised.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop
from aiohttp import web

from supervisor.upstream import HIGH_WATER, Disconnected, Response, Upstream, UpstreamError

Run = Callable[[Coroutine[Any, Any, None]], None]
RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

T = 2.0  # generous per-read timeout; a hang fails the test long before pytest-timeout
READ_SLACK = 256 * 1024  # one network read: what may arrive after reading was paused


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Iterator[Run]:
    factory = uvloop.new_event_loop if request.param == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:

        def go(coro: Coroutine[Any, Any, None]) -> None:
            runner.run(asyncio.wait_for(coro, 10))

        yield go


# ---- servers -----------------------------------------------------------------------------------


class Peers:
    """Server-side record of which TCP connection (client port) served each request."""

    def __init__(self) -> None:
        self.ports: list[int] = []

    def see(self, request: web.Request) -> int:
        assert request.transport is not None
        port = int(request.transport.get_extra_info("peername")[1])
        self.ports.append(port)
        return port

    @property
    def connections(self) -> int:
        return len(set(self.ports))


@contextlib.asynccontextmanager
async def http_server(*routes: tuple[str, Handler]) -> AsyncIterator[str]:
    app = web.Application()
    for path, handler in routes:
        app.router.add_post(path, handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


class RawServer:
    """asyncio.start_server with a per-connection handler and counters."""

    def __init__(self, handler: RawHandler) -> None:
        self.handler = handler
        self.accepted = 0
        self.eofs = 0  # connections on which the handler saw the client close
        self.writers: list[asyncio.StreamWriter] = []
        self.errors: list[BaseException] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.url = ""
        self.port = 0
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # torn down by __aexit__; 3.11's stream callback chokes on a cancelled task
        except BaseException as exc:  # surfaced by the test on exit
            self.errors.append(exc)
        finally:
            writer.close()
            self.tasks.discard(task)

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.port = port
        self.url = f"http://127.0.0.1:{port}/v1/x"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()
        if self.errors:
            raise self.errors[0]

    async def wait_eofs(self, n: int, timeout: float = T) -> None:
        async with asyncio.timeout(timeout):
            while self.eofs < n:
                await asyncio.sleep(0.005)


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(head, body) of one request with a Content-Length body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


async def until_eof(reader: asyncio.StreamReader, server: RawServer) -> None:
    """Swallow anything more and count the client's close."""
    while await reader.read(65536):
        pass
    server.eofs += 1


async def each_request(reader: asyncio.StreamReader, server: RawServer) -> AsyncIterator[bytes]:
    """The body of every request until the client closes, whose close is counted."""
    while True:
        try:
            _, body = await read_request(reader)
        except asyncio.IncompleteReadError:
            server.eofs += 1
            return
        yield body


def answer(body: bytes, *headers: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    lines = [version + b" 200 OK", b"Content-Type: text/plain; charset=utf-8",
             b"Content-Length: " + str(len(body)).encode(), *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


async def read_all(resp: Response) -> list[bytes]:
    parts = []
    while data := await resp.read_chunk(T):
        parts.append(data)
    return parts


async def finish(resp: Response) -> tuple[int, bytes]:
    """Read the answer to its end and release its connection: (status, body)."""
    data = await resp.read(T)
    resp.release()
    return resp.status, data


async def fetch(up: Upstream, url: str, body: bytes = b"{}",
                content_type: bytes = b"application/json") -> tuple[int, bytes]:
    """POST, then `finish` the answer."""
    return await finish(await up.post(url, body, content_type=content_type, timeout=T))


async def post_retrying_once(up: Upstream, url: str, body: bytes) -> Response:
    """What the proxy does: a Disconnected pooled socket is retried once, fresh."""
    try:
        return await up.post(url, body, timeout=T)
    except Disconnected:
        return await up.post(url, body, timeout=T)


async def fails_but_not_disconnected(pending: Awaitable[object]) -> None:
    """`pending` raises UpstreamError, and not Disconnected: the engine did answer."""
    with pytest.raises(UpstreamError) as caught:
        await pending
    assert not isinstance(caught.value, Disconnected)


def run_once(coro: Coroutine[Any, Any, None]) -> None:
    """Like the `run` fixture, on a fresh stock asyncio loop, for the tests not run on both."""
    asyncio.run(asyncio.wait_for(coro, 10))


def drive(run: Run, srv: RawServer, client: Callable[[Upstream], Awaitable[None]],
          up: Upstream | None = None) -> None:
    """Run `client` with an Upstream (closed after) while `srv` serves.

    Tests call it as `drive(run, srv := RawServer(handler), talk)`: the handler and `talk`
    reach the server through that `srv`.
    """

    async def go() -> None:
        async with srv, (Upstream() if up is None else up) as upstream:
            await client(upstream)

    run(go())


# ---- keep-alive and framing --------------------------------------------------------------------


def test_content_length_json_answer_and_connection_reuse(run: Run) -> None:
    peers = Peers()
    seen: list[tuple[str, str, bytes, str]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        peers.see(request)
        body = await request.read()
        seen.append((request.method, request.path_qs, body, request.headers["Content-Type"]))
        return web.json_response({"n": len(peers.ports), "echo": body.decode()})

    async def go() -> None:
        async with http_server(("/v1/x", handler)) as base, Upstream() as up:
            for n in (1, 2, 3):
                resp = await up.post(base + "/v1/x?a=1", b'{"q": %d}' % n, timeout=T)
                assert resp.status == 200
                assert resp.content_type == "application/json"  # charset stripped
                body = await resp.read(T)
                assert json.loads(body) == {"n": n, "echo": f'{{"q": {n}}}'}
                assert resp.complete
                assert await resp.read_chunk(T) == b""
                resp.release()
        assert seen == [("POST", "/v1/x?a=1", b'{"q": %d}' % n, "application/json")
                        for n in (1, 2, 3)]
        assert len(peers.ports) == 3
        assert peers.connections == 1, f"keep-alive not reused: client ports {peers.ports}"

    run(go())


def test_request_framing_seen_by_the_server(run: Run) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB request body
    got: list[tuple[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            got.append((head, body))
            writer.write(answer(b"ok"))
            await writer.drain()

    async def talk(up: Upstream) -> None:
        assert await fetch(up, srv.url + "?k=v", big, content_type=b"text/plain") == (200, b"ok")
        assert await fetch(up, srv.url, b"") == (200, b"ok")

    drive(run, srv := RawServer(handler), talk)
    assert srv.accepted == 1
    (head1, body1), (head2, body2) = got
    lines = head1.split(b"\r\n")
    assert lines[0] == b"POST /v1/x?k=v HTTP/1.1"
    assert b"Host: 127.0.0.1:%d" % srv.port in lines
    assert b"Content-Type: text/plain" in lines
    assert b"Content-Length: 1048576" in lines
    assert body1 == big
    assert head2.split(b"\r\n")[0] == b"POST /v1/x HTTP/1.1"
    assert b"Content-Type: application/json" in head2.split(b"\r\n")
    assert b"Content-Length: 0" in head2.split(b"\r\n")
    assert body2 == b""


def test_error_status_and_empty_body_keep_the_connection(run: Run) -> None:
    peers = Peers()

    async def fail(request: web.Request) -> web.StreamResponse:
        peers.see(request)
        await request.read()
        return web.json_response({"error": "busy"}, status=503)

    async def empty(request: web.Request) -> web.StreamResponse:
        peers.see(request)
        await request.read()
        return web.Response(body=b"", content_type="text/plain")

    async def go() -> None:
        async with http_server(("/fail", fail), ("/empty", empty)) as base, Upstream() as up:
            status, body = await fetch(up, base + "/fail")
            assert status == 503
            assert json.loads(body) == {"error": "busy"}
            resp = await up.post(base + "/empty", b"{}", timeout=T)
            assert (resp.status, resp.content_type) == (200, "text/plain")
            assert await resp.read_chunk(T) == b""
            assert resp.complete
            resp.release()
            status, _ = await fetch(up, base + "/fail")
            assert status == 503
        assert len(peers.ports) == 3
        assert peers.connections == 1, peers.ports

    run(go())


def test_chunked_stream_is_relayed_piece_by_piece_then_reused(run: Run) -> None:
    peers = Peers()
    pieces = [b"data: %d\n\n" % i for i in range(5)]

    async def go() -> None:
        done = asyncio.Event()

        async def stream(request: web.Request) -> web.StreamResponse:
            peers.see(request)
            await request.read()
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for piece in pieces:
                await resp.write(piece)
                await asyncio.sleep(0.03)
            await resp.write_eof()
            done.set()
            return resp

        async with http_server(("/s", stream)) as base, Upstream() as up:
            for _ in range(2):
                done.clear()
                resp = await up.post(base + "/s", b"{}", timeout=T)
                assert (resp.status, resp.content_type) == (200, "text/event-stream")
                got = [await resp.read_chunk(T)]
                assert not done.is_set(), "the first piece waited for the whole answer"
                assert not resp.complete
                got += await read_all(resp)
                assert b"".join(got) == b"".join(pieces)
                assert len(got) >= 3, f"pieces were not relayed as they came: {got}"
                assert await resp.read_chunk(T) == b""
                assert resp.complete
                resp.release()
        assert len(peers.ports) == 2
        assert peers.connections == 1, peers.ports

    run(go())


def test_connection_close_answer_is_not_reused(run: Run) -> None:
    peers = Peers()

    async def handler(request: web.Request) -> web.StreamResponse:
        peers.see(request)
        await request.read()
        resp = web.Response(body=b"bye", content_type="text/plain")
        resp.force_close()
        return resp

    async def go() -> None:
        async with http_server(("/c", handler)) as base, Upstream() as up:
            for _ in range(2):
                assert await fetch(up, base + "/c") == (200, b"bye")
        assert len(peers.ports) == 2
        assert peers.connections == 2, peers.ports

    run(go())


@pytest.mark.parametrize(("version", "headers", "reused"), [
    (b"HTTP/1.1", (b"Connection: close",), False),
    (b"HTTP/1.0", (), False),
    (b"HTTP/1.0", (b"Connection: keep-alive",), True),
    (b"HTTP/1.1", (b"Connection: keep-alive",), True),
], ids=["1.1-close", "1.0", "1.0-keep-alive", "1.1-keep-alive"])
def test_keep_alive_is_decided_by_the_answer_not_by_the_server_closing(
        run: Run, version: bytes, headers: tuple[bytes, ...], reused: bool) -> None:
    """The raw server never closes: whether the socket comes back is the client's call."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        async for _ in each_request(reader, srv):
            n += 1
            writer.write(answer(b"reply %d" % n, *headers, version=version))
            await writer.drain()

    async def talk(up: Upstream) -> None:
        for n in (1, 2):
            assert await fetch(up, srv.url) == (200, b"reply %d" % (n if reused else 1))
        if not reused:
            await srv.wait_eofs(1)  # the client dropped the first socket itself

    drive(run, srv := RawServer(handler), talk)
    assert srv.accepted == (1 if reused else 2)


def test_body_delimited_by_connection_close_is_read_whole(run: Run) -> None:
    body = bytes(range(256)) * 400  # ~100 KiB over several reads

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n")
        writer.write(body[:1000])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(body[1000:])
        await writer.drain()
        writer.close()

    async def talk(up: Upstream) -> None:
        for _ in range(2):
            resp = await up.post(srv.url, b"{}", timeout=T)
            assert (resp.status, resp.content_type) == (200, "text/plain")
            assert await resp.read(T) == body
            assert resp.complete
            resp.release()

    drive(run, srv := RawServer(handler), talk)
    assert srv.accepted == 2


def test_answer_in_tiny_segments(run: Run) -> None:
    wire = (b"HTTP/1.1 201 Created\r\nContent-Type: application/x-ndjson\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunked(b'{"a":1}\n', b'{"b":2}\n'))

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            for i in range(len(wire)):
                writer.write(wire[i:i + 1])
                await writer.drain()
                await asyncio.sleep(0.0005)

    async def talk(up: Upstream) -> None:
        for _ in range(2):
            resp = await up.post(srv.url, b"{}", timeout=T)
            assert (resp.status, resp.content_type) == (201, "application/x-ndjson")
            assert await resp.read(T) == b'{"a":1}\n{"b":2}\n'
            resp.release()

    drive(run, srv := RawServer(handler), talk)
    assert srv.accepted == 1


# ---- engines that go away ----------------------------------------------------------------------


@pytest.mark.parametrize("read_first", [True, False])
def test_close_without_answer_is_disconnected(run: Run, read_first: bool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if read_first:
            await read_request(reader)

    async def talk(up: Upstream) -> None:
        with pytest.raises(Disconnected):
            await up.post(srv.url, b"{}", timeout=T)

    drive(run, srv := RawServer(handler), talk)
    assert srv.accepted == 1


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_truncated_body_is_upstream_error_not_disconnected(run: Run, framing: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if framing == "length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 40)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + b"28\r\n" + b"x" * 40 + b"\r\n")
        await writer.drain()

    async def talk(up: Upstream) -> None:
        resp = await up.post(srv.url, b"{}", timeout=T)
        assert resp.status == 200
        await fails_but_not_disconnected(resp.read(T))
        assert not resp.complete
        resp.release()  # an incomplete answer is dropped, not pooled
        resp2 = await up.post(srv.url, b"{}", timeout=T)
        assert await resp2.read_chunk(T) == b"x" * 40  # what came is still relayed
        await fails_but_not_disconnected(resp2.read_chunk(T))
        resp2.close()

    drive(run, srv := RawServer(handler), talk)
    assert srv.accepted == 2


def test_pooled_connection_closed_while_idle_is_not_used(run: Run) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"answer %d" % srv.accepted))
        await writer.drain()
        await asyncio.sleep(0.05)  # the engine's idle timeout, much shortened

    async def talk(up: Upstream) -> None:
        assert await fetch(up, srv.url) == (200, b"answer 1")
        await asyncio.sleep(0.2)  # the server has closed the idle socket
        assert await finish(await post_retrying_once(up, srv.url, b"{}")) == (200, b"answer 2")

    drive(run, srv := RawServer(handler), talk)
    assert srv.accepted == 2


def test_pooled_connection_closed_just_before_reuse_fails_fast(run: Run) -> None:
    """The close crosses the next request on the wire: Disconnected, then a fresh socket."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = srv.accepted
        while True:
            await read_request(reader)
            writer.write(answer(b"answer %d" % n))
            await writer.drain()

    async def talk(up: Upstream) -> None:
        assert await fetch(up, srv.url) == (200, b"answer 1")
        await asyncio.sleep(0.02)
        srv.writers[0].transport.abort()  # the client has not seen it yet
        outcome = "reused"
        try:
            resp = await up.post(srv.url, b"{}", timeout=T)
        except Disconnected:
            outcome = "disconnected"
            resp = await up.post(srv.url, b"{}", timeout=T)
        assert await finish(resp) == (200, b"answer 2"), outcome

    drive(run, srv := RawServer(handler), talk)
    assert srv.accepted == 2


# ---- timeouts ----------------------------------------------------------------------------------


def test_read_chunk_times_out_on_silence(run: Run) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        await writer.drain()
        await until_eof(reader, srv)

    async def talk(up: Upstream) -> None:
        resp = await up.post(srv.url, b"{}", timeout=T)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await resp.read_chunk(0.2)
        took = loop.time() - started
        assert 0.15 <= took < 1.0, took
        resp.release()  # not complete: dropped
        await srv.wait_eofs(1)

    drive(run, srv := RawServer(handler), talk)


def test_post_timeout_closes_the_socket(run: Run) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await until_eof(reader, srv)

    async def talk(up: Upstream) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await up.post(srv.url, b"{}", timeout=0.2)
        assert loop.time() - started < 1.0
        await srv.wait_eofs(1, timeout=1.0)
        assert not up._busy and not any(up._idle.values())

    drive(run, srv := RawServer(handler), talk)


# ---- backpressure and closing ------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_backpressure_bounds_what_is_buffered(run: Run, framing: str) -> None:
    body = bytes(range(256)) * (16 * 1024)  # 4 MiB

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if framing == "length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            step = 64 * 1024
            writer.write(chunked(*(body[i:i + step] for i in range(0, len(body), step))))
        await writer.drain()
        await until_eof(reader, srv)

    async def talk(up: Upstream) -> None:
        resp = await up.post(srv.url, b"{}", timeout=T)
        await asyncio.sleep(0.3)  # a slow client
        conn = resp._conn
        assert conn.paused
        assert HIGH_WATER < conn.buffered <= HIGH_WATER + READ_SLACK, conn.buffered
        got = bytearray()
        biggest = 0
        while data := await resp.read_chunk(T):
            biggest = max(biggest, len(data))
            got += data
            await asyncio.sleep(0.01)
        assert biggest <= HIGH_WATER + READ_SLACK, biggest
        assert len(got) == len(body)
        assert got == body
        assert resp.complete and not conn.paused
        resp.release()

    drive(run, srv := RawServer(handler), talk)


def test_close_mid_answer_is_seen_by_the_engine(run: Run) -> None:
    peers = Peers()

    async def go() -> None:
        gone = asyncio.Event()

        async def endless(request: web.Request) -> web.StreamResponse:
            peers.see(request)
            await request.read()
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            try:
                for _ in range(500):
                    await resp.write(b"data: tick\n\n")
                    await asyncio.sleep(0.01)
            except ConnectionError:
                gone.set()
            return resp

        async def once(request: web.Request) -> web.StreamResponse:
            peers.see(request)
            return web.Response(body=await request.read())

        async with (http_server(("/endless", endless), ("/once", once)) as base,
                    Upstream() as up):
            resp = await up.post(base + "/endless", b"{}", timeout=T)
            assert (await resp.read_chunk(T)).startswith(b"data: tick")
            resp.close()
            async with asyncio.timeout(1.0):
                await gone.wait()
            resp.release()  # after close: a no-op, never pooled
            assert await fetch(up, base + "/once", b"fresh") == (200, b"fresh")
        assert peers.connections == 2, peers.ports

    run(go())


def test_upstream_close_drops_idle_and_busy_connections(run: Run) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        if b"/slow" in head.split(b"\r\n")[0]:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        else:
            writer.write(answer(b"whole"))
        await writer.drain()
        await until_eof(reader, srv)

    async def talk(up: Upstream) -> None:
        busy = await up.post(srv.url.replace("/v1/x", "/slow"), b"{}", timeout=T)
        assert await busy.read_chunk(T) == b"partial"
        assert await fetch(up, srv.url) == (200, b"whole")  # and pooled idle
        assert srv.accepted == 2
        await up.close()
        await srv.wait_eofs(2, timeout=1.0)
        with pytest.raises(UpstreamError):
            await busy.read(T)

    drive(run, srv := RawServer(handler), talk)


def test_release_before_the_end_drops_the_connection(run: Run) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            whole = answer(b"y" * 100_000)
            writer.write(whole[:-99_000])
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(whole[-99_000:])
            await writer.drain()

    async def talk(up: Upstream) -> None:
        resp = await up.post(srv.url, b"{}", timeout=T)
        assert await resp.read_chunk(T) == b"y" * 1000
        assert not resp.complete
        resp.release()  # read partly: the rest must not leak into the next answer
        assert await fetch(up, srv.url) == (200, b"y" * 100_000)

    drive(run, srv := RawServer(handler), talk)
    assert srv.accepted == 2


def test_unsolicited_bytes_on_an_idle_connection_drop_it(run: Run) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = srv.accepted
        await read_request(reader)
        writer.write(answer(b"conn %d" % n))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(answer(b"stale"))
        await writer.drain()
        await until_eof(reader, srv)

    async def talk(up: Upstream) -> None:
        assert await fetch(up, srv.url) == (200, b"conn 1")
        await asyncio.sleep(0.2)
        await srv.wait_eofs(1)  # the client dropped the socket that spoke out of turn
        assert await fetch(up, srv.url) == (200, b"conn 2")

    drive(run, srv := RawServer(handler), talk)
    assert srv.accepted == 2


def test_concurrent_posts_open_separate_connections_then_share_the_pool(run: Run) -> None:
    peers = Peers()

    async def slow(request: web.Request) -> web.StreamResponse:
        peers.see(request)
        body = await request.read()
        await asyncio.sleep(0.1)
        return web.Response(body=body)

    async def go() -> None:
        async with http_server(("/slow", slow)) as base, Upstream() as up:

            async def one(i: int) -> None:
                assert await fetch(up, base + "/slow", b"%d" % i) == (200, b"%d" % i)

            await asyncio.gather(one(1), one(2))
            assert peers.connections == 2
            await one(3)
            await one(4)
            await asyncio.gather(one(5), one(6))
        assert len(peers.ports) == 6
        assert peers.connections == 2, peers.ports

    run(go())


# ---- malformed answers and bad targets ---------------------------------------------------------


@pytest.mark.parametrize("wire", [
    b"HTTP/1.1 2x0 OK\r\n\r\n",
    b"NOT HTTP AT ALL\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: nine\r\n\r\n",
], ids=["bad-status", "not-http", "bad-length"])
def test_malformed_answer_is_upstream_error(run: Run, wire: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(wire)
        await writer.drain()
        await until_eof(reader, srv)

    async def talk(up: Upstream) -> None:
        await fails_but_not_disconnected(up.post(srv.url, b"{}", timeout=T))
        await srv.wait_eofs(1, timeout=1.0)  # and the socket is dropped

    drive(run, srv := RawServer(handler), talk)


def test_malformed_chunk_mid_body_is_upstream_error_and_not_pooled(run: Run) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = srv.accepted == 1
        await read_request(reader)
        if first:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nhello\r\nZZ\r\nworld\r\n")
        else:
            writer.write(answer(b"good"))
        await writer.drain()
        await until_eof(reader, srv)

    async def talk(up: Upstream) -> None:
        resp = await up.post(srv.url, b"{}", timeout=T)
        assert resp.status == 200
        await fails_but_not_disconnected(resp.read(T))
        resp.release()
        assert await fetch(up, srv.url) == (200, b"good")
        await srv.wait_eofs(1)

    drive(run, srv := RawServer(handler), talk)
    assert srv.accepted == 2


@pytest.mark.parametrize("url", [
    "https://127.0.0.1:8080/v1/x",
    "ftp://127.0.0.1/v1/x",
    "http:///v1/x",
    "localhost:8080/v1/x",
    "",
])
def test_non_http_urls_are_rejected(run: Run, url: str) -> None:
    async def go() -> None:
        async with Upstream() as up:
            with pytest.raises(UpstreamError):
                up._target(url)
            with pytest.raises(UpstreamError):
                await up.post(url, b"{}", timeout=T)

    run(go())


@pytest.mark.parametrize("url", ["http://127.0.0.1:notaport/v1/x", "http://127.0.0.1:99999/"])
def test_bad_port_in_url_is_upstream_error(url: str) -> None:
    """post() promises UpstreamError for a target it cannot use, not urllib's ValueError."""

    async def go() -> None:
        async with Upstream() as up:
            with pytest.raises(UpstreamError):
                await up.post(url, b"{}", timeout=T)

    run_once(go())


def test_interim_1xx_answer_is_not_taken_for_the_final_one() -> None:
    """RFC 9110 §15.2: a client MUST parse 1xx answers it did not ask for before the final one."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n"
                     b"hello")
        await writer.drain()
        await until_eof(reader, srv)

    async def talk(up: Upstream) -> None:
        resp = await up.post(srv.url, b"{}", timeout=T)
        assert (resp.status, resp.content_type) == (200, "text/plain")
        assert await resp.read(T) == b"hello"

    drive(run_once, srv := RawServer(handler), talk)


def test_target_is_parsed_once_with_default_port_and_query() -> None:
    up = Upstream()
    key, line = up._target("http://engine/v1/chat?x=1")
    assert key == ("engine", 80)
    assert line == b"POST /v1/chat?x=1 HTTP/1.1\r\nHost: engine\r\n"
    assert up._target("http://engine:8081")[0] == ("engine", 8081)
    assert up._target("http://engine:8081")[1].startswith(b"POST / HTTP/1.1\r\n")


def test_connection_refused_is_upstream_error(run: Run) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there

    async def go() -> None:
        async with Upstream() as up:
            with pytest.raises(UpstreamError) as caught:
                await up.post(f"http://127.0.0.1:{port}/v1/x", b"{}", timeout=T)
            assert str(port) in str(caught.value)

    run(go())


def test_expired_idle_connection_is_not_reused(run: Run) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for _ in each_request(reader, srv):
            writer.write(answer(b"ok"))
            await writer.drain()

    async def talk(up: Upstream) -> None:
        assert await fetch(up, srv.url) == (200, b"ok")
        assert await fetch(up, srv.url) == (200, b"ok")  # within the window: reused
        assert srv.accepted == 1
        await asyncio.sleep(0.1)
        assert await fetch(up, srv.url) == (200, b"ok")
        assert srv.accepted == 2
        await srv.wait_eofs(1)  # and the expired one was closed, not leaked

    drive(run, srv := RawServer(handler), talk, Upstream(keepalive=0.05))
