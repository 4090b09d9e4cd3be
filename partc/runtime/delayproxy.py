"""A TCP forwarding proxy that delays every chunk by a one-way latency, both ways.

The testbed runs one in each receiving network namespace: this kernel has no ``netem``,
so ``tc`` shapes a link's rate and this proxy adds its latency (it holds each chunk until
it arrived + the delay, so throughput is kept). A new delay in seconds, one per line on
stdin, takes effect for the chunks that arrive after it.

    python -m partc.runtime.delayproxy --listen 10.231.0.2:50051 --to 127.0.0.1:50052 \\
        --delay 0.005 --ready-file /tmp/proxy.ready
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

CHUNK = 65536


async def _serve(listen: str, to: str, delay: list[float], ready: Path) -> None:
    loop = asyncio.get_running_loop()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get())[1]:
                if (wait := item[0] - loop.time()) > 0:
                    await asyncio.sleep(wait)
                writer.write(item[1])
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

        task = asyncio.create_task(deliver())
        try:
            while chunk := await reader.read(CHUNK):
                queue.put_nowait((loop.time() + delay[0], chunk))
        finally:
            queue.put_nowait((0.0, b""))
            await task

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = to.rsplit(":", 1)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        except OSError:
            pass
        finally:
            writer.close()
            up_writer.close()

    if listen.startswith("unix:"):
        server = await asyncio.start_unix_server(connection, listen.removeprefix("unix:"))
    else:
        host, port = listen.rsplit(":", 1)
        server = await asyncio.start_server(connection, host, int(port))
    tmp = ready.with_name(ready.name + ".tmp")
    tmp.write_text(json.dumps({"address": listen}))
    os.replace(tmp, ready)
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    """The delay proxy the testbed runs in a receiving namespace; new delays (seconds) come on stdin."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m partc.runtime.delayproxy", description=main.__doc__)
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--to", required=True, metavar="HOST:PORT")
    parser.add_argument("--delay", type=float, required=True, metavar="SECONDS", help="one-way delay")
    parser.add_argument("--ready-file", type=Path, required=True)
    args = parser.parse_args(argv)
    delay = [args.delay]

    def read_delays() -> None:
        for line in sys.stdin:
            delay[0] = float(line)

    threading.Thread(target=read_delays, daemon=True).start()
    asyncio.run(_serve(args.listen, args.to, delay, args.ready_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
