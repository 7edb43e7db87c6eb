"""mcpool's data plane: the MPTCP concentrator proxy, its client library, lab and CLI."""

__version__ = "0.1.0"
