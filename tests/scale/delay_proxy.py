"""A small user-space TCP proxy that delays every chunk by a configurable time (the kernel here has
no netem). Started inside a host's namespace through the bed's process helper:

    python -m tests.scale.delay_proxy LISTEN_HOST:PORT TARGET_HOST:PORT DELAY_FILE

``DELAY_FILE`` holds the one-way delay in seconds; it is read again for every chunk, so a test
changes the delay of live connections by rewriting it (``set_delay``).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path


def set_delay(delay_file: Path, seconds: float) -> None:
    tmp = delay_file.with_suffix(".tmp")
    tmp.write_text(f"{seconds}\n")
    tmp.replace(delay_file)


def _delay(delay_file: Path) -> float:
    try:
        return max(0.0, float(delay_file.read_text().strip() or 0))
    except (OSError, ValueError):
        return 0.0


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_file: Path) -> None:
    """Copy one direction; chunks keep their order (each waits its delay in turn, as on a long wire)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, chunk = await queue.get()
            if not chunk:
                break
            await asyncio.sleep(max(0.0, due - loop.time()))
            writer.write(chunk)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(send())
    try:
        while chunk := await reader.read(65536):
            queue.put_nowait((loop.time() + _delay(delay_file), chunk))
    except ConnectionError:
        pass
    queue.put_nowait((loop.time() + _delay(delay_file), b""))
    with contextlib.suppress(ConnectionError):
        await sender


async def main(listen: str, target: str, delay_file: Path) -> None:
    listen_host, listen_port = listen.rsplit(":", 1)
    target_host, target_port = target.rsplit(":", 1)

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(target_host, int(target_port))
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            _pipe(client_reader, server_writer, delay_file), _pipe(server_reader, client_writer, delay_file)
        )

    server = await asyncio.start_server(handle, listen_host, int(listen_port))
    print(f"delaying {listen} -> {target} by the seconds in {delay_file}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
