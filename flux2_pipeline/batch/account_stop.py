"""Stops every runner of a step from submitting once the account itself is refused.

A refusal of the account (no balance, a bad or expired token, no permission: see
`flux2_pipeline.runcomfy.codes`) fails every row the same way, so the first one ends the
submitting for all the partitions that share this object; jobs already submitted are
still followed to their end. The reason is in words a person can act on, and it is what
every row not sent says.

Example::

    >>> stop = AccountStop()
    >>> stop.refuse("account balance too low (400002): top up the account and re-run")
    >>> stop.not_sent_error()
    'not submitted: account balance too low (400002): top up the account and re-run'
"""

from __future__ import annotations


class AccountStop:
    """The account refusal seen first by any runner sharing this object, if any."""

    def __init__(self) -> None:
        self.reason: str | None = None

    @property
    def refused(self) -> bool:
        return self.reason is not None

    def refuse(self, reason: str) -> None:
        """Record the refusal; the first reason is kept (the later ones say the same)."""
        if self.reason is None:
            self.reason = reason

    def not_sent_error(self) -> str:
        """The error of a row this refusal kept from being sent."""
        return f"not submitted: {self.reason}"
