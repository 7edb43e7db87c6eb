"""`mcpool cpe`: the home gateway's converter. The LAN's plain TCP is intercepted with TPROXY and
carried over the CPE's links as MPTCP.

The kernel side (`kernel.tproxy.cpe_ruleset`, installed at start and removed at exit): a SYN
from a LAN interface that carries no MPTCP option at all goes to the converter's IP_TRANSPARENT
listener (a phone's own MPTCP is forwarded untouched); the converter's sockets are routed
locally by the `socket transparent` rule and the fwmark rule; the MPTCP sockets it opens carry
SO_MARK, which an nft postrouting rule turns into the marker DSCP on every subflow of both
families (IPV6_TCLASS is refused on MPTCP sockets). Bridge netfilter, when a LAN bridge loads
it, hands bridged packets to the IP hooks where TPROXY's socket assignment is lost: it is turned
off in this namespace.

The pipeline is the MCP's (`server.Proxy` with the transparent front): accept, who may come in
(the LAN prefixes), the original destination from `getsockname()`, connection limits, upstream,
the same relay, metrics (`mode="transparent"`), spans, `/connections` and drain. Only the
upstream room differs, by mode:

- `implicit`: a marked MPTCP connection to the original destination, from the LAN host's own
  address (IP_TRANSPARENT; `source: client`) or the CPE's (`source: cpe`); an MCP on the DSL
  path terminates it, the kernel's path manager adds the other links' subflows.
- `convert`: an MPTCP connection to `converter` carrying an RFC 8803 Convert message (in the
  SYN with TCP Fast Open once the kernel has a cookie); the converter's reply is read before
  the relay starts and bytes behind it are handed to the LAN host first.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import signal
import socket
import sys
import time

from ..codec.convert import ConvertError
from ..config import ConfigError, dscp_value, split_hostport
from ..fronts import Handshake
from ..kernel.mptcp import wait_writable
from ..kernel.sysctl import write_sysctl
from ..kernel.tproxy import (
    CPE_TABLE,
    TproxyTarget,
    cpe_ruleset,
    install_routing,
    install_table,
    remove_routing,
    remove_table,
    table_exists,
)
from ..observe.logs import configure_logging
from ..server import READY_LINE, Proxy
from ..upstream import UpstreamError, UpstreamOptions, classify_errno, connect_upstream
from .config import CpeConfig, load_cpe_config
from .convert_client import (
    ConvertRefused,
    _open_socket,
    _ReplyReader,
    _start_connect,
    build_request,
)

__all__ = ["CPE_TABLE", "CpeConverter", "main"]

log = logging.getLogger("mcpool.cpe")

_BRIDGE_SYSCTLS = ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables")


class CpeConverter:
    """The converter: `await start()` installs the kernel rules and starts the pipeline;
    `await stop()` undoes both."""

    def __init__(self, config: CpeConfig) -> None:
        self.config = config
        self.proxy = Proxy(config.to_proxy_config(), connector=self._connect)
        self._installed = False

    def ruleset(self) -> str:
        cfg = self.config
        return cpe_ruleset(
            [TproxyTarget(*split_hostport(a)) for a in cfg.listen], lan_interfaces=cfg.lan_interfaces,
            sources=cfg.lan_prefixes, fwmark=cfg.fwmark,
            dscp_mark=cfg.marker.socket_mark if cfg.mode == "implicit" else None,
            dscp=dscp_value(cfg.marker.dscp), table=cfg.nft_table,
        )  # fmt: skip

    async def start(self) -> None:
        cfg = self.config
        for name in _BRIDGE_SYSCTLS:
            write_sysctl(name, 0)  # absent unless br_netfilter is loaded: then nothing to do
        try:
            install_table(self.ruleset())
            self._installed = True
            install_routing(cfg.fwmark, cfg.route_table, cfg.rule_priority)
            await self.proxy.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        await self.proxy.stop()
        if self._installed:
            cfg = self.config
            remove_table(cfg.nft_table)
            remove_routing(cfg.fwmark, cfg.route_table, cfg.rule_priority)
            self._installed = False

    def cleanup(self) -> list[str]:
        """Remove what a killed converter of this configuration left in the namespace (its nft
        table, ip rules and routes): `mcpool cpe --cleanup-only`. A start replaces them anyway."""
        cfg = self.config
        removed = []
        if table_exists(cfg.nft_table):
            remove_table(cfg.nft_table)
            removed.append(f"nft table inet {cfg.nft_table}")
        remove_routing(cfg.fwmark, cfg.route_table, cfg.rule_priority)
        removed.append(f"ip rule fwmark {cfg.fwmark:#x} lookup {cfg.route_table} and its routes")
        return removed

    async def _connect(self, hs: Handshake, host: str, port: int, source: str | None) -> socket.socket:
        cfg = self.config
        if cfg.mode == "implicit":
            options = UpstreamOptions(source=source, mark=cfg.marker.socket_mark)
            sock, _ = await connect_upstream(host, port, "mptcp", cfg.connect_timeout_s, options)
            return sock
        assert cfg.converter is not None
        return await self._convert(hs, split_hostport(cfg.converter), (host, port))

    async def _convert(self, hs: Handshake, converter: tuple[str, int], destination: tuple[str, int]) -> socket.socket:
        """RFC 8803 Convert to the converter; bytes relayed behind its reply go to the LAN host."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in converter[0] else socket.AF_INET
        try:
            sock = _open_socket(family, mptcp=True, source=None)
        except OSError as exc:
            raise classify_errno(exc.errno, f"cannot create a socket: {exc.strerror}") from None
        where = f"converter {converter[0]}:{converter[1]}"
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                payload = build_request(destination)
                sent = _start_connect(sock, converter, payload, self.config.fastopen)
                await wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise classify_errno(err, f"connect to {where}: {errno.errorcode.get(err, err)}")
                if sent < len(payload):
                    await loop.sock_sendall(sock, payload[sent:])
                reader = _ReplyReader()
                while (result := reader.feed(await loop.sock_recv(sock, 4096))) is None:
                    pass
            reply, rest = result
            if reply.error is not None:
                raise ConvertRefused(reply.error.code, reply.error.value)
            if rest:
                await loop.sock_sendall(hs.sock, rest)
            return sock
        except UpstreamError:
            sock.close()
            raise
        except TimeoutError:
            sock.close()
            raise classify_errno(None, f"{where} did not answer in {self.config.connect_timeout_s:g}s") from None
        except ConvertRefused as exc:
            sock.close()
            # The converter could not reach the destination (or refused us): the LAN host sees a
            # refused connection either way.
            raise classify_errno(errno.ECONNREFUSED, f"{where} refused: {exc}") from None
        except (ConvertError, ConnectionError, OSError) as exc:
            sock.close()
            raise classify_errno(getattr(exc, "errno", None) or errno.EIO, f"{where}: {exc}") from None


async def _run(config: CpeConfig) -> int:
    converter = CpeConverter(config)
    try:
        await converter.start()
    except (OSError, RuntimeError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    print(READY_LINE, flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        started = time.monotonic()
        aborted = await converter.proxy.drain(config.drain_timeout_s)
        log.info("stopped", extra={"fields": {"closed_at_deadline": aborted,
                                              "drain_s": round(time.monotonic() - started, 3)}})
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await converter.stop()
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mcpool cpe", description="Run the CPE converter (implicit or Convert mode).")
    parser.add_argument("--config", required=True, help="YAML configuration file (see cpe/config.py)")
    parser.add_argument("--cleanup-only", action="store_true",
                        help="remove the nft table, ip rules and routes a killed converter of this "
                        "configuration left, and exit")
    args = parser.parse_args(argv)
    try:
        config = load_cpe_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    if args.cleanup_only:
        try:
            removed = CpeConverter(config).cleanup()
        except (RuntimeError, OSError) as exc:
            log.error("cleanup failed: %s", exc)
            return 1
        log.info("cleanup done", extra={"fields": {"removed": removed}})
        return 0
    return asyncio.run(_run(config))
