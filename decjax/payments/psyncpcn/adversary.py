"""PSyncPCN faults: party modes, member behaviours, splits, replays; a fixed-delay scheduler."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from decjax.payments.committee import Behaviour
from decjax.payments.network import AsyncNetwork, Envelope

PARTY_MODES = ("honest", "silent", "lying", "mute", "forger")


@dataclasses.dataclass(frozen=True)
class FixedDelay:
    """Scheduler delivering every message after exactly ``step`` (one message delay)."""

    step: float = 1.0

    def delay(self, env: Envelope, net: AsyncNetwork) -> float:
        return self.step


@dataclasses.dataclass
class Adversary:
    """Faults of one run.

    Attributes:
      members: ``(cid, k) -> Behaviour`` for member ``k`` of ``W_cid`` (fresh objects per run).
      parties: ``party -> mode``: ``silent`` (never answers), ``lying`` (bad consent
        signatures; a lying sender sends a bad ``COND_1``), ``mute`` (consents, then ignores
        everything), ``forger`` (sender: forges ``R``'s acceptance; others: inject forged
        votes to committees after consenting).
      split: ``cid -> member indices`` that read a conflicting registration (allowed only with
        ``>= f+1`` faulty members in that committee: registration consistency needs ``<= f``).
      replays: old envelopes re-injected; cross_replays: old votes re-sent under another
        payment or to another committee.
    """

    members: Mapping[tuple[str, int], Behaviour] = dataclasses.field(default_factory=dict)
    parties: Mapping[str, str] = dataclasses.field(default_factory=dict)
    split: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)
    replays: int = 0
    cross_replays: int = 0
