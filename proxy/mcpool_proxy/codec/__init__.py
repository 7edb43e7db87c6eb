"""Pure protocol codecs: functions over bytes, no I/O, no asyncio.

- `convert`: RFC 8803 Convert messages and TLVs.
- `socks5`: SOCKS5 (RFC 1928 CONNECT, RFC 1929 username/password).

Every malformed input raises the codec's own error (`ConvertError`, `Socks5Error`) and nothing
else; the fronts (`mcpool_proxy.fronts`) turn those into answers.
"""
