"""Watching bare file descriptors on the event loop at the least cost per call (the relay's and
the upstream connect's per-connection readiness callbacks)."""

from __future__ import annotations

import asyncio
from asyncio import selector_events
from collections.abc import Callable
from typing import Any

__all__ = ["FdWatch"]


class FdWatch:
    """A loop's add/remove reader/writer for bare descriptors. On asyncio's selector loop these
    are its unchecked variants: the public ones first look the descriptor up among the loop's
    transports (a weak-dictionary miss, raised and caught), which showed at a few per cent of the
    proxy's CPU per connection; the relay's descriptors never belong to a transport. Other
    loops (uvloop) get their public methods."""

    __slots__ = ("add_reader", "remove_reader", "add_writer", "remove_writer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        if isinstance(loop, selector_events.BaseSelectorEventLoop):
            self.add_reader: Callable[..., Any] = loop._add_reader  # type: ignore[attr-defined]
            self.remove_reader: Callable[[int], Any] = loop._remove_reader  # type: ignore[attr-defined]
            self.add_writer: Callable[..., Any] = loop._add_writer  # type: ignore[attr-defined]
            self.remove_writer: Callable[[int], Any] = loop._remove_writer  # type: ignore[attr-defined]
        else:
            self.add_reader, self.remove_reader = loop.add_reader, loop.remove_reader
            self.add_writer, self.remove_writer = loop.add_writer, loop.remove_writer
