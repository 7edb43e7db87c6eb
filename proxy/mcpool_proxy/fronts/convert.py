"""The RFC 8803 Convert front: a client's Convert message in, a destination (or an Error TLV) out.

Checks, in order, each failure answered with an Error TLV and a close: malformed/oversized
message (1; unsupported version 0; client-only TLV rules 2), client not in `allowed_cpes` (32,
at accept), cookie (3), destination refused (32), TCP options in the Connect TLV the converter
cannot honour (33); then, asked by the pipeline, connection limits (64) and the upstream connect
(96/97/65, see `upstream.py`). A timeout before a complete message closes without an answer
(counted). An Info-only message is answered with the Supported TCP Extensions TLV and closed.

On success the answer carries an Extended TCP Header TLV rebuilt from the upstream socket's
TCP_INFO (`kernel.mptcp.synack_from_tcp_info`), and a Supported TCP Extensions TLV if the client
sent Info. Bytes the client sent after its Convert message are never read here, so the relay
forwards them upstream in order.
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
    ExtendedTcpHeaderTLV,
    InfoTLV,
    SupportedTcpExtensionsTLV,
    decode_message,
    encode_message,
    error_message,
    message_length,
    validate_client_request,
)
from ..kernel.mptcp import synack_from_tcp_info
from ..policy import Refusal, address_str, format_endpoint
from .base import ClientGone, Destination, Front, Handshake, Oversize

if TYPE_CHECKING:
    from ..upstream import UpstreamError

__all__ = ["SUPPORTED_TCP_OPTION_KINDS", "ConvertDestination", "ConvertFront", "check_tcp_options"]

log = logging.getLogger("mcpool.proxy")

# TCP option kinds the converter supports (RFC 8803 Supported TCP Extensions): what the Linux
# stack negotiates with servers (MSS, window scale, SACK, timestamps) and, towards clients, MPTCP.
SUPPORTED_TCP_OPTION_KINDS: tuple[int, ...] = (2, 3, 4, 8, 30)


@dataclass(eq=False, slots=True)
class ConvertDestination(Destination):
    wants_info: bool = False  # the client sent an Info TLV: answer with Supported TCP Extensions


def check_tcp_options(options: bytes) -> ConvertError | None:
    """The Connect TLV's TCP options: only what the kernel negotiates anyway is accepted."""
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:  # End of Option List (and the TLV's zero padding)
            return None
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2 or i + options[i + 1] > len(options):
            return ConvertError(ErrorCode.MALFORMED_MESSAGE, "malformed TCP option in Connect TLV")
        if kind not in SUPPORTED_TCP_OPTION_KINDS:
            return ConvertError(ErrorCode.UNSUPPORTED_TCP_OPTION, f"TCP option kind {kind} is not supported")
        i += options[i + 1]
    return None


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
        # Not Authorized (32) for a stranger, Resource Exceeded (64) for a flood.
        code = ErrorCode.RESOURCE_EXCEEDED if refusal.reason == "max_handshakes" else ErrorCode.NOT_AUTHORIZED
        await self.refuse(hs, code, refusal.detail, refusal=refusal)

    async def handshake(self, hs: Handshake) -> ConvertDestination | None:
        try:
            raw = await hs.read_message(_convert_length, hs.deadline())
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

        refusal = hs.policy.check_cookie(message.cookie.cookie if message.cookie is not None else None)
        if refusal is not None:
            await self.refuse(hs, ErrorCode.MISSING_COOKIE, refusal.detail, refusal=refusal)
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
        option_error = check_tcp_options(connect.tcp_options)
        if option_error is not None:
            await self.refuse(hs, option_error.code, option_error.detail, destination=_destination_text(hs))
            return None
        return ConvertDestination([connect.address], connect.port, wants_info=wants_info)

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
        header = synack_from_tcp_info(upstream)
        if header is not None:
            tlvs.append(ExtendedTcpHeaderTLV(header))
        await hs.send(encode_message(tlvs))
