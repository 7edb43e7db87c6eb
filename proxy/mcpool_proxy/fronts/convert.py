"""The RFC 8803 Convert front: a client's Convert message in, a destination (or an Error TLV) out.

Checks, in order, each failure answered with an Error TLV and a close: malformed/oversized
message (1; unsupported version 0; client-only TLV rules 2), client not in `allowed_cpes` (32,
at accept), cookie (3 when missing, 32 when wrong or not this client's), destination refused
(32), TCP options in the Connect TLV the converter cannot honour (33); then, asked by the pipeline, connection limits (64) and the upstream connect
(96/97/65, see `upstream.py`). A timeout before a complete message closes without an answer
(counted). An Info-only message is answered with the Supported TCP Extensions TLV and closed.

On success the answer carries a Supported TCP Extensions TLV if the client sent Info, and no
Extended TCP Header TLV (see `answer_connected`: the kernel does not let the connecting side read
the server's SYN-ACK, and invented values must not be sent). TCP options of the Connect TLV are
applied to the upstream SYN or refused (`check_tcp_options`). Bytes the client sent after its
Convert message go upstream in order: those its SYN carried (TCP Fast Open) in the upstream's SYN
too (`Destination.early_data`); otherwise the message's first read may take what came right
behind it (`Handshake.pending`), which the relay sends first.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..codec.convert import (
    HEADER_BYTES,
    ConvertError,
    ConvertMessage,
    ErrorCode,
    InfoTLV,
    SupportedTcpExtensionsTLV,
    decode_message,
    encode_message,
    error_message,
    message_length,
    validate_client_request,
)
from ..kernel.mptcp import fastopen_used
from ..kernel.sysctl import syn_option_kinds
from ..limits import RESOURCE_REASONS
from ..policy import MISSING_COOKIE, Refusal, address_str, format_endpoint
from .base import ClientGone, Destination, Front, Handshake, Oversize

if TYPE_CHECKING:
    from ..upstream import UpstreamError

__all__ = ["SUPPORTED_TCP_OPTION_KINDS", "ConvertDestination", "ConvertFront", "TcpOptionPlan", "check_tcp_options"]

log = logging.getLogger("mcpool.proxy")

# TCP option kinds the converter supports (RFC 8803 Supported TCP Extensions): what the Linux
# stack negotiates with servers (MSS, window scale, SACK, timestamps) and, towards clients, MPTCP.
SUPPORTED_TCP_OPTION_KINDS: tuple[int, ...] = (2, 3, 4, 8, 30)


@dataclass(eq=False, slots=True)
class ConvertDestination(Destination):
    wants_info: bool = False  # the client sent an Info TLV: answer with Supported TCP Extensions


@dataclass(frozen=True, slots=True)
class TcpOptionPlan:
    """What the Connect TLV's TCP options ask of the upstream SYN that the converter does itself."""

    mss: int | None = None  # announce this MSS (TCP_MAXSEG before connect)


def check_tcp_options(
    options: bytes, *, upstream_mptcp: bool, syn_kinds: frozenset[int] = frozenset((3, 4, 8))
) -> tuple[ConvertError | None, TcpOptionPlan]:
    """The Connect TLV's TCP options (RFC 8803 section 4.2.3: options the client wants in the SYN
    to the server): each is applied or refused, never checked and then ignored.

    - MSS (2): applied, as TCP_MAXSEG on the upstream socket before its connect;
    - window scale (3), SACK permitted (4), timestamps (8): the kernel puts them in every SYN when
      this namespace's sysctls say so (`syn_kinds`, `kernel.sysctl.syn_option_kinds`), so they
      are honoured then and refused otherwise;
    - MPTCP (30): honoured only with `upstream.protocol: mptcp`; with a TCP upstream the server
      would never see it, so it is refused;
    - anything else: refused. A refusal is Unsupported TCP Option (33) with the option's kind as
      its value.
    """
    mss: int | None = None
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:  # End of Option List (and the TLV's zero padding)
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2 or i + options[i + 1] > len(options):
            return ConvertError(ErrorCode.MALFORMED_MESSAGE, "malformed TCP option in Connect TLV"), TcpOptionPlan()
        length = options[i + 1]
        body = options[i + 2 : i + length]
        if kind == 2:
            if length != 4 or int.from_bytes(body, "big") < 88:
                return _unsupported(kind, "an MSS option needs length 4 and a value of at least 88")
            mss = int.from_bytes(body, "big")
        elif kind == 30:
            if not upstream_mptcp:
                return _unsupported(kind, "MPTCP (kind 30) asked for, but upstream.protocol is tcp")
        elif kind in (3, 4, 8):
            if kind not in syn_kinds:
                return _unsupported(kind, f"TCP option kind {kind} is turned off in this namespace's sysctls")
        else:
            return _unsupported(kind, f"TCP option kind {kind} cannot be applied to the upstream SYN")
        i += length
    return None, TcpOptionPlan(mss)


def _unsupported(kind: int, detail: str) -> tuple[ConvertError, TcpOptionPlan]:
    return ConvertError(ErrorCode.UNSUPPORTED_TCP_OPTION, detail, bytes([kind])), TcpOptionPlan()


# The most a client's SYN can carry (TCP Fast Open data fits in one segment).
_SYN_DATA_MAX = 65_536


# The first read of a Convert message may take this much more (Handshake.read_message's spill):
# a request the client sent right behind its Convert message comes in the same read.
_SPILL_BYTES = 4096


def _syn_data(hs: Handshake, syn_data: bool | None) -> bytes:
    """The bytes past the Convert message that came in the client's SYN (TCP Fast Open), taken
    now so that the upstream SYN can carry them too (0-RTT on both legs); b"" if the SYN had no
    data or nothing is left of it."""
    if not syn_data:
        return b""
    try:
        return hs.sock.recv(_SYN_DATA_MAX)
    except (BlockingIOError, InterruptedError):
        return b""
    except OSError:
        return b""


def _convert_length(prefix: bytes) -> int:
    total = message_length(prefix)
    return HEADER_BYTES if total is None else total


def _destination_text(hs: Handshake) -> str:
    assert hs.destination is not None
    return format_endpoint(*hs.destination)


class ConvertFront(Front[ConvertDestination]):
    protocol = "convert"

    async def refuse(
        self,
        hs: Handshake,
        code: ErrorCode,
        detail: str,
        value: bytes = b"",
        refusal: Refusal | None = None,
        **fields: Any,
    ) -> None:
        """Answer with an Error TLV of `code` (counted, logged, traced), then close."""
        error = code.name.lower()
        hs.count_error(error)
        hs.count_refusal(refusal)
        hs.log_refusal(error, detail, code=int(code), **fields)
        hs.answered = True
        hs.trace.error_sent("convert", error, int(code), detail)
        try:
            await hs.send(error_message(code, value))
        except OSError:
            return
        await hs.close_after_answer()

    async def refuse_at_accept(self, hs: Handshake, refusal: Refusal) -> None:
        # Not Authorized (32) for a stranger, Resource Exceeded (64) for a flood (all clients' or
        # one CPE's: limits.py).
        code = ErrorCode.RESOURCE_EXCEEDED if refusal.reason in RESOURCE_REASONS else ErrorCode.NOT_AUTHORIZED
        await self.refuse(hs, code, refusal.detail, refusal=refusal)

    async def handshake(self, hs: Handshake) -> ConvertDestination | None:
        # Whether the SYN carried data is known from the accept on. Without SYN data, what
        # follows the message is the relay's, so the message's first read may take it too
        # (kept in hs.pending, sent upstream first); with SYN data, the message is read exactly,
        # so that the SYN's bytes can be told apart and go in the upstream SYN.
        syn_data = fastopen_used(hs.sock)
        try:
            raw = await hs.read_message(_convert_length, hs.deadline(),
                                        spill=0 if syn_data or syn_data is None else _SPILL_BYTES)  # fmt: skip
            message: ConvertMessage = decode_message(raw)
            connect = validate_client_request(message)
        except ConvertError as exc:
            await self.refuse(hs, exc.code, exc.detail)
            return None
        except Oversize as exc:
            await self.refuse(hs, ErrorCode.MALFORMED_MESSAGE, str(exc))
            return None
        except TimeoutError:
            hs.count_error("timeout")
            hs.log_refusal("timeout", "no complete Convert message in time")
            return None
        except (ClientGone, OSError) as exc:
            hs.count_error("client_closed")
            log.debug("convert client %s gone: %s", format_endpoint(*hs.client), exc)
            return None

        refusal = hs.policy.check_cookie(message.cookie.cookie if message.cookie is not None else None, hs.client[0])
        if refusal is not None:
            # RFC 8803 section 4.2.8: Missing Cookie (3) when there is none, Not Authorized (32)
            # when the one sent is not valid for this client.
            code = ErrorCode.MISSING_COOKIE if refusal.reason == MISSING_COOKIE else ErrorCode.NOT_AUTHORIZED
            await self.refuse(hs, code, refusal.detail, refusal=refusal)
            return None
        wants_info = any(isinstance(tlv, InfoTLV) for tlv in message.tlvs)
        if connect is None:
            # Info only: say what we support and close; there is nothing to relay.
            try:
                await hs.send(encode_message([SupportedTcpExtensionsTLV(SUPPORTED_TCP_OPTION_KINDS)]))
            except OSError:
                hs.count_error("client_closed")
                return None
            await hs.close_after_answer()
            return None

        hs.set_destination(address_str(connect.address), connect.port)
        refusal = hs.policy.check_destination(connect.address, connect.port)
        if refusal is not None:
            await self.refuse(
                hs, ErrorCode.NOT_AUTHORIZED, refusal.detail, refusal=refusal, destination=_destination_text(hs)
            )
            return None
        option_error, plan = check_tcp_options(
            connect.tcp_options, upstream_mptcp=hs.config.upstream.protocol == "mptcp", syn_kinds=syn_option_kinds()
        )
        if option_error is not None:
            await self.refuse(hs, option_error.code, option_error.detail, option_error.value,
                              destination=_destination_text(hs))  # fmt: skip
            return None
        return ConvertDestination([connect.address], connect.port, tcp_mss=plan.mss,
                                  early_data=_syn_data(hs, syn_data), wants_info=wants_info)  # fmt: skip

    async def refuse_over_limit(self, hs: Handshake, dest: ConvertDestination, refusal: Refusal) -> None:
        await self.refuse(
            hs, ErrorCode.RESOURCE_EXCEEDED, refusal.detail, refusal=refusal, destination=_destination_text(hs)
        )

    async def refuse_upstream(self, hs: Handshake, dest: ConvertDestination, error: UpstreamError) -> None:
        await self.refuse(
            hs, error.convert_code, error.detail, error.convert_value, destination=_destination_text(hs)
        )

    async def answer_connected(self, hs: Handshake, dest: ConvertDestination, upstream: socket.socket) -> None:
        tlvs: list[Any] = []
        if dest.wants_info:
            tlvs.append(SupportedTcpExtensionsTLV(SUPPORTED_TCP_OPTION_KINDS))
        # No Extended TCP Header TLV: it must be the server's SYN-ACK as received, and Linux keeps
        # no copy of a SYN-ACK for the connecting side (TCP_SAVED_SYN is the listener's SYN), nor
        # its sequence numbers, window or timestamp values; rebuilding one from TCP_INFO would
        # send invented values. RFC 8803 lets the converter leave it out.
        await hs.send(encode_message(tlvs))
