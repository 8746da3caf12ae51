"""Cost of the connection guard (telemetry/connections.py) per send, against the
bare stream in the same run.

Every send hypercorn makes goes through ``_DeadlineStream.send_all``: a cancel
scope with the send deadline and an idle ``Event`` for ``send_eof``. This times
a 200-byte send plus its receive on an in-memory stream pair, bare and guarded,
alternating rounds so that drift on a shared machine hits both alike.

    .venv/bin/python -m bench.bench_guard [--sends N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import time

import trio
import trio.testing

from telemetry.connections import ConnectionGuard, _DeadlineStream


async def _time(sends: int, guarded: bool) -> float:
    """Microseconds per send + receive."""
    sender, receiver = trio.testing.memory_stream_pair()
    stream = (_DeadlineStream(sender, ConnectionGuard(send_timeout_s=20, frame_cap=1 << 20))
              if guarded else sender)
    data = b"x" * 200
    t0 = time.perf_counter()
    for _ in range(sends):
        await stream.send_all(data)
        await receiver.receive_some(65536)
    return (time.perf_counter() - t0) / sends * 1e6


async def main(sends: int, rounds: int) -> None:
    bare: list[float] = []
    guarded: list[float] = []
    for _ in range(rounds):
        bare.append(await _time(sends, guarded=False))
        guarded.append(await _time(sends, guarded=True))
    b, g = statistics.median(bare), statistics.median(guarded)
    print(f"bench_guard: {rounds} rounds of {sends} sends (200 B), median per send + receive")
    print(f"  bare stream       {b:7.2f} us")
    print(f"  guarded stream    {g:7.2f} us")
    print(f"  guard overhead    {g - b:7.2f} us per send ({g / b:.2f}x the bare stream)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sends", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    trio.run(main, args.sends, args.rounds)
