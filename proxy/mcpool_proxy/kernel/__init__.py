"""Every kernel interface of mcpool, each named once, next to the kernel version it needs and
what happens without it.

- `mptcp`: MPTCP sockets, MPTCP_INFO and the subflow list, TCP Fast Open, TCP_INFO.
- `mptcp_events`: the `mptcp_pm` generic netlink events (one subscription per process).
- `sysctl`: every sysctl, the one read-before-write helper, the proxy's own settings.
- `path_manager`: the in-kernel path manager's endpoints and the MPTCP connection list (iproute2).
- `steering`: nftables, xtables, routes and VXLAN tunnels of the director and its pods.

Nothing outside this package opens a netlink socket, sets a socket option, writes a sysctl or
runs `nft`, `ip` or `ss` (tests/unit/test_layout.py checks the spelling).
"""
