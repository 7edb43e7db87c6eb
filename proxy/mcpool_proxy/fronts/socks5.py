"""The SOCKS5 front (RFC 1928 CONNECT, RFC 1929 username/password): greeting, authentication and
request in, a destination (or a refusal in SOCKS5's terms) out.

A client refused at accept for a resource (`limits.RESOURCE_REASONS`: too many handshakes in all
or of this CPE, a CPE opening connections too fast) gets "no acceptable methods" (0xFF) at once,
the only answer to a greeting that costs nothing more; a stranger gets the same (always while
refusals pile up, `Handshake.linger_s` 0), or, when it offers no authentication, its request read and answered with "connection not allowed by ruleset" (0x02).
A domain name is resolved by c-ares on the loop (`resolver.py`: bounded in time and in names at
once, a busy resolver answered general failure, a failed name host unreachable); the policy checks every address, and at
most `_SOCKS5_MAX_CANDIDATES` allowed addresses are handed to the pipeline, which tries them in
turn. The success reply carries the upstream socket's local address.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import TYPE_CHECKING, Any

from ..codec.socks5 import (
    Method,
    Reply,
    Socks5Error,
    encode_method_selection,
    encode_reply,
    encode_userpass_status,
    greeting_length,
    parse_greeting,
    parse_request,
    parse_userpass,
    request_length,
    userpass_length,
)
from ..limits import RESOURCE_REASONS
from ..policy import IPAddress, Refusal, format_endpoint, normalize_address
from ..resolver import ResolveFailed, ResolverBusy
from .base import ClientGone, Destination, Front, Handshake, Oversize

if TYPE_CHECKING:
    from ..upstream import UpstreamError

__all__ = ["Socks5Front"]

log = logging.getLogger("mcpool.proxy")

# How long a SOCKS5 client refused at accept may take to send the request it is refused for.
_REFUSAL_HANDSHAKE_S = 2.0
# Resolved addresses of a SOCKS5 domain name tried in turn, at most.
_SOCKS5_MAX_CANDIDATES = 3


class Socks5Front(Front[Destination]):
    protocol = "socks5"

    async def refuse(
        self,
        hs: Handshake,
        answer: bytes | None,
        error: str,
        detail: str,
        refusal: Refusal | None = None,
        **fields: Any,
    ) -> None:
        """Send `answer` (None: nothing fits, just close), counted, logged and traced; close."""
        hs.count_error(error)
        hs.count_refusal(refusal)
        hs.log_refusal(error, detail, **fields)
        if answer is not None:
            hs.answered = True
            # The code the client reads: the reply field (or the method/auth status byte).
            hs.trace.error_sent("socks5", error, answer[1] if len(answer) > 1 else None, detail)
            try:
                await hs.send(answer)
            except OSError:
                return
        await hs.close_after_answer()

    async def refuse_at_accept(self, hs: Handshake, refusal: Refusal) -> None:
        # The client's first message is its greeting: "no acceptable methods" (0xFF) answers it.
        answer: bytes | None = encode_method_selection(Method.NO_ACCEPTABLE)
        if refusal.reason not in RESOURCE_REASONS and hs.linger_s > 0:
            # RFC 1928's "connection not allowed by ruleset" (0x02) is an answer to a request:
            # take the greeting and the request (briefly, never checking credentials), then say it.
            deadline = hs.deadline(min(hs.config.policy.handshake_timeout_s, _REFUSAL_HANDSHAKE_S))
            try:
                methods = parse_greeting(await hs.read_message(greeting_length, deadline))
                if Method.NO_AUTH in methods:
                    await hs.send(encode_method_selection(Method.NO_AUTH))
                    parse_request(await hs.read_message(request_length, deadline))
                    answer = encode_reply(Reply.NOT_ALLOWED)
            except (Socks5Error, Oversize, TimeoutError, ClientGone, OSError):
                answer = None
        await self.refuse(hs, answer, "not_allowed", refusal.detail, refusal=refusal)

    async def handshake(self, hs: Handshake) -> Destination | None:
        deadline = hs.deadline()
        stage = "greeting"
        try:
            methods = parse_greeting(await hs.read_message(greeting_length, deadline))
            auth = hs.policy.socks5_auth_required
            method = Method.USERNAME_PASSWORD if auth else Method.NO_AUTH
            if method not in methods:
                wanted = "username/password authentication" if auth else "the no-authentication method"
                await self.refuse(
                    hs, encode_method_selection(Method.NO_ACCEPTABLE), "no_acceptable_method",
                    f"client does not offer {wanted}",
                )
                return None
            await hs.send(encode_method_selection(method))
            if auth:
                stage = "authentication"
                username, password = parse_userpass(await hs.read_message(userpass_length, deadline))
                refusal = hs.policy.check_socks5_credentials(username, password)
                if refusal is not None:
                    await self.refuse(hs, encode_userpass_status(False), "auth_failed", refusal.detail, refusal=refusal)
                    return None
                await hs.send(encode_userpass_status(True))
            stage = "request"
            request = parse_request(await hs.read_message(request_length, deadline))
        except Socks5Error as exc:
            answer = None if exc.reply is None or stage != "request" else encode_reply(exc.reply)
            error = "protocol_error" if exc.reply is None else exc.reply.name.lower()
            await self.refuse(hs, answer, error, f"{stage}: {exc.detail}")
            return None
        except Oversize as exc:
            answer = encode_reply(Reply.GENERAL_FAILURE) if stage == "request" else None
            await self.refuse(hs, answer, "oversize", str(exc))
            return None
        except TimeoutError:
            hs.count_error("timeout")
            hs.log_refusal("timeout", f"no complete SOCKS5 {stage} in time")
            return None
        except (ClientGone, OSError) as exc:
            hs.count_error("client_closed")
            log.debug("socks5 client %s gone during %s: %s", format_endpoint(*hs.client), stage, exc)
            return None

        hs.requested = request.host if isinstance(request.host, str) else None
        hs.set_destination(str(request.host), request.port)
        candidates = await self._candidates(hs, request.host, request.port)
        if candidates is None:
            return None
        return Destination(candidates, request.port, hs.requested)

    async def _candidates(self, hs: Handshake, host: IPAddress | str, port: int) -> list[IPAddress] | None:
        """Destination addresses allowed by policy (a domain resolved by `hs.resolver`); None if
        refused (already answered)."""
        if isinstance(host, str):
            try:
                names = await hs.resolver.resolve(host, port)
            except ResolverBusy as exc:
                await self.refuse(hs, encode_reply(Reply.GENERAL_FAILURE), "resolver_busy", f"cannot resolve {host!r}: {exc}")
                return None
            except ResolveFailed as exc:
                await self.refuse(
                    hs, encode_reply(Reply.HOST_UNREACHABLE), "host_unreachable", f"cannot resolve {host!r}: {exc}"
                )
                return None
            resolved: list[IPAddress] = []
            for text in names:
                addr = normalize_address(text)
                if addr not in resolved:
                    resolved.append(addr)
        else:
            resolved = [normalize_address(host)]
        allowed: list[IPAddress] = []
        first_refusal: Refusal | None = None
        for addr in resolved:
            refusal = hs.policy.check_destination(addr, port)
            if refusal is None:
                allowed.append(addr)
            elif first_refusal is None:
                first_refusal = refusal
        if not allowed:
            assert first_refusal is not None
            await self.refuse(
                hs, encode_reply(Reply.NOT_ALLOWED), "not_allowed", first_refusal.detail,
                refusal=first_refusal, destination=str(host),
            )
            return None
        # Each candidate may take connect_timeout_s: a name with dozens of unroutable addresses
        # must not hold a client (and its connection slot) for minutes.
        return allowed[:_SOCKS5_MAX_CANDIDATES]

    async def refuse_over_limit(self, hs: Handshake, dest: Destination, refusal: Refusal) -> None:
        await self.refuse(hs, encode_reply(Reply.NOT_ALLOWED), "not_allowed", refusal.detail, refusal=refusal)

    async def refuse_upstream(self, hs: Handshake, dest: Destination, error: UpstreamError) -> None:
        reply = error.socks5_reply
        await self.refuse(hs, encode_reply(reply), reply.name.lower(), error.detail)

    async def answer_connected(self, hs: Handshake, dest: Destination, upstream: socket.socket) -> None:
        bound = upstream.getsockname()
        await hs.send(encode_reply(Reply.SUCCEEDED, ipaddress.ip_address(bound[0]), bound[1]))
