"""A decode budget counted in pixels, shared by every decode that runs at once.

Memory for a decoded image grows with its pixels (up to 4 bytes each as Pillow stores
them), not with its file size: a 343 KB PNG may declare 88 megapixels. Each decode holds
its pixel count from one `PixelBudget` while its buffer is alive, so the decodes of a
step together never hold more than the budget. An image larger than the whole budget
waits until it is alone and is then decoded by itself. Waiters are served in the order
they came, so a big image is not starved by a stream of small ones.

Example::

    budget = PixelBudget(120_000_000)
    with budget.hold(8000 * 6000):   # waits while other decodes hold too much
        image.load()
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


class PixelBudget:
    """At most `pixels` pixels decoded at once, across threads; first come, first served.

    Example::

        budget = PixelBudget(100)
        with budget.hold(60):
            budget.in_use   # 60; another hold(60) waits until this one ends
    """

    def __init__(self, pixels: int) -> None:
        if pixels < 1:
            raise ValueError(f"a pixel budget must be at least 1 pixel, got {pixels}")
        self.pixels = pixels
        self._used = 0
        self._queue: deque[object] = deque()
        self._changed = threading.Condition()

    @property
    def in_use(self) -> int:
        """Pixels held right now."""
        with self._changed:
            return self._used

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Hold `pixels` of the budget for the block; wait first while they do not fit.

        A request larger than the whole budget counts as the whole budget: it waits until
        nothing else is held, and nothing else starts while it runs.
        """
        wanted = max(0, min(pixels, self.pixels))
        ticket = object()
        with self._changed:
            self._queue.append(ticket)
            try:
                self._changed.wait_for(
                    lambda: self._queue[0] is ticket and self._used + wanted <= self.pixels
                )
            finally:
                self._queue.remove(ticket)
                self._changed.notify_all()
            self._used += wanted
        try:
            yield
        finally:
            with self._changed:
                self._used -= wanted
                self._changed.notify_all()
