"""A CPE whose join comes late, run inside the client namespace (tests/affinity).

Opens one MPTCP connection from --source to the VIP with no second address configured, reads
the pod's first byte, prints "connected" and waits for a line on stdin; the test then adds the
client's subflow endpoint, so the kernel's path manager opens the MP_JOIN only once the pod has
registered the token. Then it reads the pod's name, sends --bytes, compares the echo and prints
one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys

IPPROTO_MPTCP = 262


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vip", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--bytes", type=int, default=64 * 1024)
    args = p.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    sock.settimeout(15)
    sock.bind((args.source, 0))
    sock.connect((args.vip, args.port))
    assert sock.recv(1) == b"+"
    print("connected", flush=True)
    sys.stdin.readline()
    name = b""
    while not name.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        name += chunk
    payload = os.urandom(args.bytes)
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    echo = hashlib.sha256()
    while data := sock.recv(65536):
        echo.update(data)
    sock.close()
    print(json.dumps({"pod": name.decode().strip(), "sha_ok": echo.hexdigest() == hashlib.sha256(payload).hexdigest()}),
          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
