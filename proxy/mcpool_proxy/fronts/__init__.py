"""The ways into the proxy, one module each: `convert` (RFC 8803), `socks5` and `transparent`
(implicit mode, TPROXY).

A front is the protocol in front of one pipeline, as Envoy puts a protocol in a listener filter
in front of one `tcp_proxy`. The pipeline (`server.Proxy`) runs every accepted connection
through the same rooms, calling its listener's front at the marked steps:

1. accept, and who may come in (`policy.check_client`, `policy.max_handshakes`, the per-CPE caps
   of `limits.py`: they apply to every front); if refused,
   `front.refuse_at_accept(hs, refusal)` answers in the front's protocol;
2. `front.handshake(hs)`: read the request with the codec (`mcpool_proxy.codec`), ask the policy
   about credentials and the destination, answer and refuse in the protocol's own codes; returns
   a `Destination` (candidate addresses the policy allows, the port, the requested name) or None
   when the connection ends there;
3. where to: a connection slot (`policy.acquire`), else `front.refuse_over_limit(...)`;
4. upstream: each candidate in turn (`upstream.connect_upstream`), else
   `front.refuse_upstream(hs, dest, error)` with the last `UpstreamError`, which carries the
   answer for every protocol;
5. `front.answer_connected(hs, dest, upstream)`: tell the client; then the relay.

`Handshake` (in `base.py`) is the connection until the relay: its socket, trace and counters,
and the reading, answering and logging every front does the same way. A front never connects
upstream, relays or closes the client's socket.

Adding a way in (e.g. a transparent front, `transparent.py`, reading the original destination
from the accepted socket instead of a request): subclass `Front`, give it a `protocol` that is
also its listener's key in `config.listen` and its `connections.Mode`, put it in `FRONTS`, and put
its kernel set-up (TPROXY rules, IP_TRANSPARENT) in `mcpool_proxy.kernel`. Its handshake may
read nothing at all; its refusals may be a reset.
"""

from __future__ import annotations

from typing import Any

from .base import ClientGone, Destination, Front, Handshake, Oversize
from .convert import ConvertFront
from .socks5 import Socks5Front
from .transparent import TransparentFront

__all__ = ["FRONTS", "ClientGone", "ConvertFront", "Destination", "Front", "Handshake", "Oversize", "Socks5Front", "TransparentFront"]

# Every front by its protocol name, in the order the proxy binds their listeners.
FRONTS: dict[str, Front[Any]] = {front.protocol: front for front in (ConvertFront(), Socks5Front(),
                                                                     TransparentFront())}
