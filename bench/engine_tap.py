"""A TCP relay in front of the engine that notes when each request reached it and when the engine's answer left it.

`bench/engines.py` puts one in front of vLLM for both sides of its pairs: the client's direct requests come in on one
port, the gateway's on another, and both go on to the same vLLM. For every request it logs, as tab-separated lines
on stdout (times from `time.perf_counter`, the same clock in every process on the machine):

    req   <side> <prompt> <t>   its first bytes arrived from the client or the gateway
    done  <side> <prompt> <t>   the piece with the engine's `data: [DONE]` was handed on
    end   <side> <prompt> <t>   the piece with the end of the engine's chunked body was handed on

What the engine took for a request is then known on both sides, and a client's latency minus it is what the path
outside the engine took: for the gateway's side, the gateway.

    python bench/engine_tap.py --upstream 127.0.0.1:8000 --listen direct=9001 --listen gateway=9002
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from collections.abc import Awaitable, Callable

_PROMPT = re.compile(rb'"prompt": ?"((?:[^"\\]|\\.)*)"')
_DONE = b"data: [DONE]"
_END = b"0\r\n\r\n"


class _Exchange:
    """The request on one connection whose answer is being relayed (requests on a connection come one at a time)."""

    __slots__ = ("done", "prompt")

    def __init__(self) -> None:
        self.prompt: str | None = None
        self.done = False


def _log(kind: str, side: str, prompt: str | None, at: float) -> None:
    if prompt is not None:
        sys.stdout.write(f"{kind}\t{side}\t{prompt}\t{at:.6f}\n")
        sys.stdout.flush()


async def _pipe_requests(side: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         exchange: _Exchange) -> None:
    while data := await reader.read(65536):
        at = time.perf_counter()
        found = _PROMPT.search(data)
        if found is not None:
            exchange.prompt, exchange.done = found.group(1).decode(), False
            _log("req", side, exchange.prompt, at)
        writer.write(data)
    if writer.can_write_eof():
        writer.write_eof()
    else:
        writer.close()


async def _pipe_answers(side: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        exchange: _Exchange) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        at = time.perf_counter()
        if _DONE in data:
            exchange.done = True
            _log("done", side, exchange.prompt, at)
        if exchange.done and data.endswith(_END):
            _log("end", side, exchange.prompt, at)
            exchange.done = False
    writer.close()


def _serve(side: str, host: str, port: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            engine_reader, engine_writer = await asyncio.open_connection(host, port)
        except OSError:
            client_writer.close()
            return
        exchange = _Exchange()
        tasks = [asyncio.ensure_future(_pipe_requests(side, client_reader, engine_writer, exchange)),
                 asyncio.ensure_future(_pipe_answers(side, engine_reader, client_writer, exchange))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            client_writer.close()
            engine_writer.close()

    return handle


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="the engine, HOST:PORT")
    parser.add_argument("--listen", action="append", required=True, help="SIDE=PORT on 127.0.0.1 (repeatable)")
    args = parser.parse_args(argv)
    host, port = args.upstream.rsplit(":", 1)
    servers = []
    for item in args.listen:
        side, listen_port = item.split("=", 1)
        servers.append(await asyncio.start_server(_serve(side, host, int(port)), "127.0.0.1", int(listen_port)))
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await asyncio.gather(*(server.serve_forever() for server in servers))


if __name__ == "__main__":
    asyncio.run(main())
