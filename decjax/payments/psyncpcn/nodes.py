"""PSyncPCN nodes: the shared run log, channel arbiters, committee members and parties."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from decjax.payments.channels import LOCKED, Channel
from decjax.payments.checkers import PaymentRecord
from decjax.payments.committee import Behaviour, Committee, Member
from decjax.payments.crypto import KeyRegistry, QuorumCertificate, SignedStatement, Statement
from decjax.payments.errors import ConfigError, LockError, PaymentError
from decjax.payments.events import Node, Simulator
from decjax.payments.psyncpcn.adversary import PARTY_MODES
from decjax.payments.psyncpcn.messages import (
    ABORT,
    COMMIT,
    Consent,
    ConsentRequest,
    Init,
    Route,
    SignedRoute,
    Vote,
    consent_statements,
)


class _Ledger:
    """Shared run log: QCs assembled anywhere (with where and when), ledger resolutions."""

    def __init__(self, sim: Simulator, registry: KeyRegistry,
                 committees: dict[str, Committee], records: dict[str, PaymentRecord]):
        self.sim, self.registry, self.committees, self.records = sim, registry, committees, records
        self.qcs: list[tuple[float, str, QuorumCertificate]] = []
        self.resolutions: list[tuple[float, str, int, str, bool, int]] = []

    def note_qc(self, qc: QuorumCertificate, where: str) -> None:
        st = qc.statement
        self.qcs.append((self.sim.now, where, qc))
        self.sim.record("qc", where=where, pid=st.pid, cid=st.cid, phase=st.phase,
                        decision=st.decision or "")


class ChannelArbiter:
    """The registered state of one channel, kept by its committee (see item 5 of
    :mod:`decjax.payments.psyncpcn`)."""

    def __init__(self, channel: Channel, committee: Committee, log: _Ledger,
                 split: Sequence[str] = ()):
        self.channel, self.committee, self.log = channel, committee, log
        self.split = frozenset(split)
        self.registrations: dict[str, str] = {}
        self.votes: dict[tuple[str, str], dict[str, SignedStatement]] = {}
        self.decided: dict[str, str] = {}

    def register(self, member: str, sr: SignedRoute, i: int) -> str:
        """``"ok"`` if ``a_i`` is locked for the payment, else the reason it cannot be."""
        if member in self.split:
            return "conflicting registration"
        pid = sr.route.pid
        if pid not in self.registrations:
            self.registrations[pid] = self._try_lock(sr, i)
            self.log.sim.record("register", pid=pid, cid=self.channel.cid,
                                result=self.registrations[pid])
        return self.registrations[pid]

    def _try_lock(self, sr: SignedRoute, i: int) -> str:
        route, reg = sr.route, self.log.registry
        payer, payee = route.parties[i], route.parties[i + 1]
        if route.pid not in self.log.records:
            return "unknown payment"
        if {payer, payee} != set(self.channel.parties):
            return "route does not match channel endpoints"
        sig_payer, sig_payee = sr.cond_sigs[i]
        if not (reg.verify(payer, route.cond(i), sig_payer)
                and reg.verify(payee, route.cond(i), sig_payee)):
            return "invalid COND signature"
        if i == route.hops - 1 and not reg.verify(payee, route.accept(), sr.accept_sig):
            return "invalid receiver acceptance"
        try:
            self.channel.lock(self.log.records[route.pid].lock_ids[i], payer, route.amounts[i],
                              pid=route.pid)
        except PaymentError as err:
            return str(err)
        return "ok"

    def add_vote(self, vote: SignedStatement, depth: int) -> None:
        """Record a member's decision; apply the ledger effect when the first QC forms."""
        st = vote.statement
        if not (self.committee.is_member(vote.signer) and vote.verify(self.log.registry)):
            return
        votes = self.votes.setdefault((st.pid, st.decision), {})
        votes[vote.signer] = vote
        if len(votes) != self.committee.quorum:
            return
        qc = QuorumCertificate.from_votes(votes.values())
        self.log.note_qc(qc, f"registry:{self.channel.cid}")
        if st.pid not in self.decided:
            self._apply(st.pid, st.seq - 1, st.decision, depth)

    def _apply(self, pid: str, i: int, decision: str, depth: int) -> None:
        self.decided[pid] = decision
        lock_id = self.log.records[pid].lock_ids[i]
        had_lock = self.channel.status(lock_id) == LOCKED
        if had_lock:
            (self.channel.settle if decision == COMMIT else self.channel.refund)(lock_id)
        self.log.resolutions.append((self.log.sim.now, pid, i, decision, had_lock, depth))
        self.log.sim.record("resolve", pid=pid, cid=self.channel.cid, decision=decision)

    def pending(self) -> list[str]:
        return sorted(lk.pid for lk in self.channel.locks.values() if lk.pid is not None)

    def close(self) -> dict[str, int]:
        """Close the channel; refused while a payment is pending on it."""
        if self.pending():
            raise LockError(f"cannot close channel {self.channel.cid!r}: payment(s) "
                            f"{self.pending()} pending")
        return self.channel.close()


class PsyncMember(Member):
    """A member of the committee of channel ``cid``."""

    def __init__(self, member_id: str, signer: Any, registry: KeyRegistry,
                 behaviour: Behaviour | None, *, cid: str, log: _Ledger,
                 arbiters: dict[str, ChannelArbiter]):
        super().__init__(member_id, signer, registry, behaviour)
        self.cid, self.log, self.arbiters = cid, log, arbiters
        self.phase: dict[str, str] = {}
        self.depth: dict[str, int] = {}
        self.lock_votes: dict[str, dict[str, bytes]] = {}
        self.dec_votes: dict[tuple[str, str], dict[str, bytes]] = {}

    def _hop(self, sr: SignedRoute) -> int | None:
        cids = sr.route.cids
        return cids.index(self.cid) if self.cid in cids else None

    def _committee(self, route: Route, i: int) -> Committee:
        return self.log.committees[route.cids[i]]

    def on_message(self, src: str, message: Any) -> None:
        i = self._hop(message.signed) if hasattr(message, "signed") else None
        if i is None:
            return
        pid = message.signed.route.pid
        self.depth[pid] = max(self.depth.get(pid, 0), message.depth)
        if isinstance(message, Init) and i == 0 and src == message.signed.route.parties[0]:
            self._trigger(message.signed, i)
        elif isinstance(message, Vote) and message.member == src:
            self._on_vote(message, i)

    def _valid_vote(self, vote: Vote, expected: Statement, j: int) -> bool:
        return (vote.statement == expected
                and self._committee(vote.signed.route, j).is_member(vote.member)
                and self.registry.verify(vote.member, expected, vote.sig))

    def _on_vote(self, vote: Vote, i: int) -> None:
        route = vote.signed.route
        if vote.kind == "LOCK" and i > 0 and self._valid_vote(vote, route.lock(i - 1), i - 1):
            votes = self.lock_votes.setdefault(route.pid, {})
            votes[vote.member] = vote.sig
            if len(votes) >= self._committee(route, i - 1).quorum:
                self._trigger(vote.signed, i)
        elif vote.kind == "DECISION" and i + 1 < route.hops:
            decision = vote.statement.decision
            if decision not in (COMMIT, ABORT):
                return
            if not self._valid_vote(vote, route.decision(i + 1, decision), i + 1):
                return
            votes = self.dec_votes.setdefault((route.pid, decision), {})
            votes[vote.member] = vote.sig
            if len(votes) == self._committee(route, i + 1).quorum:
                qc = QuorumCertificate(vote.statement, tuple(sorted(votes.items())))
                self.log.note_qc(qc, self.id)
                self._decide(vote.signed, i, decision)

    def _trigger(self, sr: SignedRoute, i: int) -> None:
        pid = sr.route.pid
        if pid in self.phase:
            return
        result = self.arbiters[self.cid].register(self.id, sr, i)
        if result != "ok":
            self._decide(sr, i, ABORT)
        elif i == sr.route.hops - 1:
            self._decide(sr, i, COMMIT)
        else:
            self.phase[pid] = "locked"
            targets = self._committee(sr.route, i + 1).members
            self.vote_to(sr.route.lock(i), targets, self._maker("LOCK", sr))

    def _decide(self, sr: SignedRoute, i: int, decision: str) -> None:
        route = sr.route
        if self.phase.get(route.pid) == "decided":
            return
        self.phase[route.pid] = "decided"
        st = route.decision(i, decision)
        sig = self.sign(st)
        if sig is not None:
            vote = SignedStatement(st, self.id, sig)
            self.arbiters[self.cid].add_vote(vote, self.depth.get(route.pid, 0))
        if i > 0:
            self.vote_to(st, self._committee(route, i - 1).members, self._maker("DECISION", sr))
        self.vote_to(st, [route.parties[i], route.parties[i + 1]], self._maker("NOTIFY", sr))

    def _maker(self, kind: str, sr: SignedRoute):
        depth = self.depth.get(sr.route.pid, 0) + 1
        return lambda st, member, sig: Vote(kind, sr, st, member, sig, depth)


class PsyncParty(Node):
    """A channel party: sender logic, consent, and collecting NOTIFY votes into receipts."""

    def __init__(self, party: str, signer: Any, mode: str, log: _Ledger):
        super().__init__(party)
        if mode not in PARTY_MODES:
            raise ConfigError(f"party {party!r}: unknown mode {mode!r}; allowed {PARTY_MODES}")
        self.signer, self.mode, self.log = signer, mode, log
        self.pending: dict[str, tuple[Route, dict[str, tuple[bytes, ...]]]] = {}
        self.status: dict[str, str] = {}
        self.receipts: dict[tuple[str, str], str] = {}
        self.notes: dict[tuple[str, str, str], dict[str, bytes]] = {}

    def start(self, route: Route) -> None:
        """Sender: collect consent from ``u_1..u_l`` (silent senders never start)."""
        self.status[route.pid] = "consenting"
        if self.mode == "silent":
            return
        self.pending[route.pid] = (route, {})
        for party in route.parties[1:]:
            self.send(party, ConsentRequest(route, 1))

    def on_message(self, src: str, message: Any) -> None:
        if self.mode in ("silent", "mute") and not isinstance(message, ConsentRequest):
            return
        if isinstance(message, ConsentRequest) and self.mode != "silent":
            self._consent(src, message)
        elif isinstance(message, Consent):
            self._collect(src, message)
        elif isinstance(message, Vote) and message.kind == "NOTIFY":
            self._notify(message)

    def _consent(self, src: str, req: ConsentRequest) -> None:
        route = req.route
        if src != route.parties[0] or self.id not in route.parties[1:]:
            return
        sigs = tuple(self.signer.sign(st) for st in consent_statements(route, self.id))
        if self.mode == "lying":
            sigs = tuple(bytes(64) for _ in sigs)
        self.send(src, Consent(route.pid, self.id, sigs, req.depth + 1))
        if self.mode == "forger":
            self._forge(route)

    def _forge(self, route: Route) -> None:
        """Inject forged votes: garbage signatures under real member ids."""
        k = route.parties.index(self.id)
        sr = SignedRoute(route, ((bytes(64), bytes(64)),) * route.hops, bytes(64))
        for i in range(max(0, k - 1), min(route.hops, k + 1)):
            for member in self.log.committees[route.cids[i]].members:
                st = route.decision(min(i + 1, route.hops - 1), ABORT)
                self.send(member, Vote("DECISION", sr, st, member, bytes(64), 1))

    def _collect(self, src: str, consent: Consent) -> None:
        if consent.pid not in self.pending or src != consent.party:
            return
        route, got = self.pending[consent.pid]
        stmts = consent_statements(route, src)
        if len(consent.sigs) != 2 or not all(
                self.log.registry.verify(src, st, sig) for st, sig in zip(stmts, consent.sigs,
                                                                            strict=True)):
            self.status[route.pid] = "refused"
            del self.pending[route.pid]
            self.log.sim.record("refused", pid=route.pid, party=src)
            return
        got[src] = consent.sigs
        if len(got) == route.hops:
            del self.pending[route.pid]
            self._send_init(route, got, consent.depth + 1)

    def _send_init(self, route: Route, got: dict[str, tuple[bytes, ...]], depth: int) -> None:
        parties = route.parties
        conds = []
        for i in range(route.hops):
            payer = self.signer.sign(route.cond(0)) if i == 0 else got[parties[i]][1]
            conds.append((payer, got[parties[i + 1]][0]))
        accept = got[parties[-1]][1]
        if self.mode == "forger":
            accept = bytes(64)
        if self.mode == "lying":
            conds[0] = (bytes(64), conds[0][1])
        self.status[route.pid] = "started"
        self.log.sim.record("init", pid=route.pid)
        for member in self.log.committees[route.cids[0]].members:
            self.send(member, Init(SignedRoute(route, tuple(conds), accept), depth))

    def _notify(self, vote: Vote) -> None:
        st = vote.statement
        com = self.log.committees.get(st.cid or "")
        if com is None or not com.is_member(vote.member) or st.pid is None:
            return
        if not self.log.registry.verify(vote.member, st, vote.sig):
            return
        votes = self.notes.setdefault((st.pid, st.cid, st.decision), {})
        votes[vote.member] = vote.sig
        if len(votes) == com.quorum:
            self.log.note_qc(QuorumCertificate(st, tuple(sorted(votes.items()))), self.id)
            self.receipts.setdefault((st.pid, st.cid), st.decision)
