"""mcpool's data plane: the MPTCP concentrator proxy, its cluster affinity and its CPE client."""

__version__ = "0.1.0"
