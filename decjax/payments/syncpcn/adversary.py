"""SyncPCN adversaries: party strategies, colluding members and the replay hook."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from decjax.payments.committee import Behaviour, Member
from decjax.payments.crypto import Statement, digest
from decjax.payments.events import Node

if TYPE_CHECKING:
    from decjax.payments.syncpcn.party import Party
    from decjax.payments.syncpcn.run import SyncRun


class PartyBehaviour:
    """Strategy of a channel party; the base class is honest. Hooks return what the party does."""

    byzantine = False

    def sends_invoice(self, node: Party) -> bool:
        return True

    def forwards(self, node: Party, lock_id: str) -> bool:
        """Intermediary: forward the lock downstream; receiver: fulfil it."""
        return True

    def cosigns_fulfill(self, node: Party, lock_id: str) -> bool:
        return True

    def fulfils_upstream(self, node: Party, lock_id: str) -> bool:
        return True

    def claim_time(self, node: Party, deadline: float) -> float | None:
        return max(node.now, deadline - node.run.params.lead)

    def acts_on_expiry(self, node: Party) -> bool:
        return True

    def cheats_refund(self, node: Party) -> bool:
        return False

    def on_learn(self, node: Party, lock_id: str, preimage: bytes) -> bool:
        """False stops the normal reaction to learning an incoming lock's preimage."""
        return True

    def tamper(self, node: Party, amounts: list[int], deadlines: list[float]) -> None:
        """Sender: edit the amounts/deadlines put in the ADD and onion (in place)."""

    def tamper_onion(self, node: Party, onion: bytes) -> bytes:
        return onion


class Honest(PartyBehaviour):
    pass


class Silent(PartyBehaviour):
    """Does nothing after joining (silent receiver / intermediary)."""

    byzantine = True

    def sends_invoice(self, node: Party) -> bool:
        return False

    def forwards(self, node: Party, lock_id: str) -> bool:
        return False

    def cosigns_fulfill(self, node: Party, lock_id: str) -> bool:
        return False

    def fulfils_upstream(self, node: Party, lock_id: str) -> bool:
        return False

    def claim_time(self, node: Party, deadline: float) -> float | None:
        return None

    def acts_on_expiry(self, node: Party) -> bool:
        return False


class Griefer(PartyBehaviour):
    """Accepts locks and never forwards or fulfils them (liquidity griefing)."""

    byzantine = True

    def forwards(self, node: Party, lock_id: str) -> bool:
        return False


class Stingy(PartyBehaviour):
    """Never co-signs a FULFILL (forces the dispute path), otherwise rational."""

    byzantine = True

    def cosigns_fulfill(self, node: Party, lock_id: str) -> bool:
        return False


class LateClaimer(PartyBehaviour):
    """Never fulfils cooperatively; claims at ``T_i - eps`` (eps in units of Δ)."""

    byzantine = True

    def __init__(self, eps: float = 0.3):
        self.eps = eps

    def fulfils_upstream(self, node: Party, lock_id: str) -> bool:
        return False

    def claim_time(self, node: Party, deadline: float) -> float | None:
        return max(node.now, deadline - self.eps * node.run.params.delta)


class RefundCheater(Stingy):
    """Never co-signs a FULFILL and asks for a refund at ``T_i`` whatever happened."""

    def cheats_refund(self, node: Party) -> bool:
        return True


class BadOnion(PartyBehaviour):
    byzantine = True

    def tamper_onion(self, node: Party, onion: bytes) -> bytes:
        return onion[:40] + bytes([onion[40] ^ 1]) + onion[41:]


class ShortDeadlines(PartyBehaviour):
    """Sender gives the first hop less than δ of slack."""

    byzantine = True

    def tamper(self, node: Party, amounts: list[int], deadlines: list[float]) -> None:
        if len(deadlines) > 1:
            deadlines[0] = deadlines[1] + node.run.params.slack / 2


class NoFee(PartyBehaviour):
    """Sender pays the first intermediary no fee."""

    byzantine = True

    def tamper(self, node: Party, amounts: list[int], deadlines: list[float]) -> None:
        if len(amounts) > 1:
            amounts[0] = amounts[1]


class WormholeEnd(PartyBehaviour):
    """Colluder ``u_j``: passes its preimage straight to ``start`` instead of fulfilling."""

    byzantine = True

    def __init__(self, start: str):
        self.start = start

    def fulfils_upstream(self, node: Party, lock_id: str) -> bool:
        return False

    def claim_time(self, node: Party, deadline: float) -> float | None:
        return None

    def on_learn(self, node: Party, lock_id: str, preimage: bytes) -> bool:
        start = node.run.parties[self.start]
        node.run.sim.schedule(node.run.params.delta, lambda: start.wormhole(preimage))
        return False


class WormholeStart(PartyBehaviour):
    """Colluder ``u_i``: otherwise honest; receives the wormhole preimage."""

    byzantine = True


class Colluding(Behaviour):
    """Byzantine member: ``claims``/``refunds`` True signs every such dispute (late or
    conflicting), False refuses it, None follows the protocol; ``stale_close`` claims its oldest
    registered state at close."""

    byzantine = True

    def __init__(self, claims: bool | None = True, refunds: bool | None = True,
                 stale_close: bool = False):
        self.claims, self.refunds, self.stale_close = claims, refunds, stale_close

    def override(self, kind: str) -> bool | None:
        return self.refunds if kind == "REFUND" else self.claims

    def statements_for(self, member: Member, statement: Statement,
                       recipients: Sequence[str]) -> list[tuple[str, Statement]]:
        return [(r, statement) for r in recipients]


def flip_verdict(statement: Statement) -> Statement:
    """SETTLED <-> REFUNDED; other statements get a wrong state hash (for Equivocating)."""
    flips = {"SETTLED": "REFUNDED", "REFUNDED": "SETTLED"}
    if statement.decision in flips:
        return statement.replace(decision=flips[statement.decision])
    return statement.replace(state_hash=digest("equivocation", statement.state_hash))


@dataclasses.dataclass
class Adversary:
    """Who deviates: party strategies, member behaviours (by member id), a network delay
    choice (e.g. always Δ), and hooks ``hook(run)`` called before the run starts."""

    parties: Mapping[str, PartyBehaviour] = dataclasses.field(default_factory=dict)
    members: Mapping[str, Behaviour] = dataclasses.field(default_factory=dict)
    delay: Callable[[Any], float] | None = None
    hooks: Sequence[Callable[[SyncRun], None]] = ()


class Replayer:
    """Hook: at time ``at`` the network re-delivers every message sent so far, and a Byzantine
    node ``mallory`` re-sends each one to every committee member and party (cross-channel)."""

    def __init__(self, at: float):
        self.at = at

    def __call__(self, run: SyncRun) -> None:
        run.sim.add_node(Node("mallory"))
        run.sim.schedule_at(self.at, lambda: self._fire(run))

    def _fire(self, run: SyncRun) -> None:
        net = run.sim.network
        targets = sorted(run.members) + sorted(run.parties)
        for env in list(net.history):
            if env.replay_of is None and env.src != "mallory":
                net.replay(env.msg_id)
                for dst in targets:
                    if dst != env.dst:
                        run.sim.send("mallory", dst, env.message)
