"""The CPE side: what a customer's box runs to reach a concentrator.

- `convert_client`: the RFC 8803 Convert client library and `mcpool convert-client`.
"""
