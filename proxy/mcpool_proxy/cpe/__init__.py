"""The CPE side: what a customer's box (or a test, the lab, a benchmark) runs to reach a
concentrator.

- `convert_client`: the RFC 8803 Convert client library and `mcpool convert-client`.
- `socks5_client`: a blocking SOCKS5 client.
"""
