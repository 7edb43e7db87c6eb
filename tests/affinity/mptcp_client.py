"""The CPE side of the director test, run inside the client namespace.

Opens --count MPTCP connections from --source to the VIP; the kernel's path manager adds a
second subflow from the other address (an MP_JOIN). For each connection: read the pod's name
(sent once the pod saw the join complete, or gave up), send --bytes random bytes, half-close,
read the echo and compare sha256. Prints one JSON line per connection.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket

IPPROTO_MPTCP = 262


def subflows(sock: socket.socket) -> int:
    return sock.getsockopt(284, 1, 64)[0]


def one(args: argparse.Namespace) -> dict[str, object]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    sock.settimeout(10)
    sock.bind((args.source, 0))
    sock.connect((args.vip, args.port))
    name = b""
    while not name.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        name += chunk
    # The client's own count includes a join still in flight; the pod's record is the proof.
    joined = subflows(sock)
    payload = os.urandom(args.bytes)
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    echo = hashlib.sha256()
    received = 0
    while data := sock.recv(65536):
        echo.update(data)
        received += len(data)
    local = sock.getsockname()
    sock.close()
    return {
        "pod": name.decode().strip().lstrip("+"),
        "local": list(local[:2]),
        "subflows": joined,
        "sha_ok": echo.hexdigest() == hashlib.sha256(payload).hexdigest(),
        "received": received,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vip", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--bytes", type=int, default=1 << 20)
    args = p.parse_args()
    for _ in range(args.count):
        print(json.dumps(one(args)), flush=True)


if __name__ == "__main__":
    main()
