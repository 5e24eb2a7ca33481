"""Exit 0 when TCP PORT on HOST (default 127.0.0.1) can be bound, else print one line and exit 2.

`make demo` runs this first, with the system Python and the standard library only, so a busy port is
reported before minutes of installing and training (when the port was checked last, a busy one
surfaced only after 16 minutes).
"""

from __future__ import annotations

import socket
import sys


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port`` and we may bind it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR as uvicorn sets it: a port in TIME_WAIT after a previous demo counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or not argv[0].isdigit() or not 0 < int(argv[0]) < 65536:
        print("usage: port_free.py PORT [HOST]", file=sys.stderr)
        return 2
    port, host = int(argv[0]), argv[1] if len(argv) == 2 else "127.0.0.1"
    if not port_free(port, host):
        print(f"port {port} on {host} is already in use: stop what listens there, or choose another (make demo PORT=8001)",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
