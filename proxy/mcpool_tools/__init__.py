"""Tools around mcpool, not part of the product: the network-namespace lab (`lab`), the demo
(`demo`) and the pattern test server (`testserver`).

The product package (`mcpool_proxy`) never imports this one at import time; `mcpool lab` and
`mcpool demo` reach it through the CLI's lazy dispatch.
"""
