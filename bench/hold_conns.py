#!/usr/bin/env python3
"""Opens N TCP connections to HOST:PORT and holds them open, idle, until killed.

    hold_conns.py HOST PORT N READY_FILE

Used by scripts/bench.sh for the memory-per-idle-connection figure: run in the captured
client pod, every connection goes through the proxy under test. Connects one at a time
(each bounded by a 5 s timeout), then writes the number opened to READY_FILE and sleeps.
Exits non-zero if any connect fails.
"""
import os
import signal
import socket
import sys


def main() -> int:
    host, port, n, ready = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect((host, port))
        except OSError as e:
            print(f"hold_conns: connect {i + 1}/{n} to {host}:{port} failed: {e}", file=sys.stderr)
            return 1
        socks.append(s)
    tmp = ready + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{len(socks)}\n")
    os.rename(tmp, ready)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
