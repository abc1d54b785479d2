"""Error types of the payment layer.

Every error raised on bad input is a :class:`PaymentError`, itself a ``ValueError``, and its
message names the offending object (party, channel, lock, amount). Operations validate first and
mutate after, so a raised error leaves every balance unchanged.

Examples:
    >>> from decjax.payments.errors import InsufficientBalance, PaymentError
    >>> issubclass(InsufficientBalance, PaymentError) and issubclass(PaymentError, ValueError)
    True
"""


class PaymentError(ValueError):
    """Base class of every payment-layer input error."""


class InvalidAmount(PaymentError):
    """An amount is not a positive int."""


class InsufficientBalance(PaymentError):
    """A payer's free balance (or a channel's capacity) does not cover an amount."""


class UnknownParty(PaymentError):
    """A party id that is not part of the channel, graph or simulation."""


class UnknownChannel(PaymentError):
    """A channel id (or a channel between two parties) that does not exist."""


class ChannelClosed(PaymentError):
    """An operation on, or a route through, a closed channel."""


class DuplicateLock(PaymentError):
    """A lock id that is already used on the channel (pending or resolved)."""


class UnknownLock(PaymentError):
    """A lock id that is not pending on the channel."""


class LockError(PaymentError):
    """A lock cannot be resolved that way (wrong preimage, expired, no such state)."""


class NoRoute(PaymentError):
    """No path of open channels with enough free balance exists."""


class ConfigError(PaymentError):
    """Invalid parameters: committee sizes, quorums, delays, graph sizes."""


class CryptoError(PaymentError):
    """Invalid signature input, unknown key, or a malformed certificate."""


class SimulationError(PaymentError):
    """Misuse of the event loop or the network (unknown node, fairness or delay bound broken)."""
