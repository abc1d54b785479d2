"""Core of decjax.payments: event loop, networks, crypto, channels, committees, checkers."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decjax.payments import (
    ABSENT,
    LOCKED,
    REFUNDED,
    SETTLED,
    AsyncNetwork,
    Channel,
    ChannelClosed,
    ChannelGraph,
    Committee,
    ConfigError,
    Crashed,
    CryptoError,
    DuplicateLock,
    Equivocating,
    InsufficientBalance,
    InvalidAmount,
    KeyRegistry,
    LockError,
    Member,
    Node,
    NoRoute,
    PaymentError,
    PaymentRecord,
    QuorumCertificate,
    RegistrationStore,
    SignedStatement,
    SimulationError,
    Simulator,
    Statement,
    SyncNetwork,
    UnknownChannel,
    UnknownLock,
    UnknownParty,
    check_atomicity,
    check_balance_security,
    check_channel_safety,
    check_conservation,
    check_no_equivocation,
    check_qc_uniqueness,
    check_record_consistency,
    check_termination,
    digest,
    encode,
    find_fraud,
    hashlock,
    hop_amounts,
    resolve_close,
    state_statement,
    wire_size,
)

REPO = Path(__file__).resolve().parents[1]


# -- event loop and networks ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Ping:
    kind = "PING"
    ttl: int
    tag: bytes


class Gossip(Node):
    """Forwards each message to a seeded-random peer until its ttl runs out."""

    def __init__(self, node_id, peers):
        super().__init__(node_id)
        self.peers = peers
        self.got = []

    def on_message(self, src, message):
        self.got.append((src, message.ttl))
        if message.ttl > 0:
            rng = self.sim.rng_for(f"gossip/{self.id}/{len(self.got)}")
            self.send(rng.choice(self.peers), Ping(message.ttl - 1, message.tag))


def run_gossip(seed, network, n=6, ttl=25, fanout=3):
    sim = Simulator(seed, network)
    ids = [f"n{i}" for i in range(n)]
    nodes = [sim.add_node(Gossip(i, [j for j in ids if j != i])) for i in ids]
    for k in range(fanout):
        nodes[k].send(ids[(k + 1) % n], Ping(ttl, b"x" * 32))
    sim.run()
    return sim, nodes


def test_same_seed_same_trace_and_different_seed_differs():
    t0 = run_gossip(0, AsyncNetwork())[0].trace
    assert t0 == run_gossip(0, AsyncNetwork())[0].trace
    assert t0 != run_gossip(1, AsyncNetwork())[0].trace
    s0 = run_gossip(3, SyncNetwork(1.0))[0].trace
    assert s0 == run_gossip(3, SyncNetwork(1.0))[0].trace
    assert s0 != run_gossip(4, SyncNetwork(1.0))[0].trace
    # Trace entries are plain values: time, order, kind, sorted (key, value) pairs.
    assert all(isinstance(v, int | float | str | bytes) for e in t0 for _, v in e.data)


def test_trace_does_not_depend_on_pythonhashseed():
    code = (
        "import hashlib, sys; "
        "sys.path.insert(0, 'tests'); from payments_core_test import run_gossip; "
        "from decjax.payments import AsyncNetwork; "
        "print(hashlib.sha256(repr(run_gossip(5, AsyncNetwork())[0].trace).encode()).hexdigest())"
    )
    outs = {subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": seed}).stdout
            for seed in ("1", "2")}
    assert len(outs) == 1


def test_event_loop_orders_ties_by_scheduling_and_runs_until():
    sim = Simulator(0)
    order = []
    for k in range(5):
        sim.schedule(1.0, lambda k=k: order.append(k))
    handle = sim.schedule(0.5, lambda: order.append("cancelled"))
    sim.cancel(handle)
    sim.schedule(3.0, lambda: order.append("late"))
    assert sim.run(until=2.0) == 5 and order == [0, 1, 2, 3, 4] and sim.now == 2.0
    sim.run()
    assert order[-1] == "late" and sim.quiescent
    with pytest.raises(SimulationError, match="delay must be >= 0"):
        sim.schedule(-1.0, lambda: None)


def test_run_raises_on_livelock():
    sim = Simulator(0)

    def again():
        sim.schedule(1.0, again)

    sim.schedule(0.0, again)
    with pytest.raises(SimulationError, match="max_events=50"):
        sim.run(max_events=50)


def test_sync_network_never_exceeds_delta():
    sim, nodes = run_gossip(7, SyncNetwork(0.25), ttl=60)
    net = sim.network
    assert sum(len(n.got) for n in nodes) == len(net.history) > 150
    assert 0 < net.max_correct_delay <= 0.25
    assert net.fairness_violations() == []
    assert net.stats.count == {"PING": len(net.history)}
    assert net.stats.bytes["PING"] == len(net.history) * (8 + 32)


def test_sync_adversary_delay_bounded():
    sim = Simulator(0, SyncNetwork(1.0, adversary=lambda env: 1.0))
    sim.add_node(Node("a"))
    sim.add_node(Node("b"))
    sim.add_node(Node("bad"))
    sim.send("a", "b", Ping(0, b""))  # exactly delta: allowed
    sim.run()
    assert sim.now == 1.0
    sim.network.adversary = lambda env: 1.5
    with pytest.raises(SimulationError, match="sync bound broken"):
        sim.send("a", "b", Ping(0, b""))
    sim.network.mark_faulty("bad")  # links of faulty nodes carry no delay guarantee
    sim.send("bad", "b", Ping(0, b""))
    sim.run()
    assert sim.network.max_correct_delay == 1.0


def test_async_scheduler_is_fair_and_heavy_tailed():
    net = AsyncNetwork(max_delay=40.0)
    sim, nodes = run_gossip(11, net, ttl=80)
    assert len(net.delivered) == len(net.history) > 200
    assert net.fairness_violations() == []
    delays = sorted(net.delivered[e.msg_id] - e.sent_at for e in net.history)
    assert delays[-1] > 10 * delays[len(delays) // 2]  # heavy tail
    assert delays[-1] <= 40.0


class HoldFrom:
    def __init__(self, src):
        self.src = src

    def delay(self, env, net):
        return None if env.src == self.src else 0.5


def test_async_held_messages_are_fairness_violations_until_released():
    net = AsyncNetwork(HoldFrom("a"), max_delay=10.0)
    sim = Simulator(0, net)
    a, b = sim.add_node(Gossip("a", ["b"])), sim.add_node(Gossip("b", ["a"]))
    a.send("b", Ping(0, b""))
    b.send("a", Ping(0, b""))
    sim.run()
    assert [e.src for e in net.fairness_violations()] == ["a"] and b.got == []
    net.release_all(delay=1.0)
    sim.run()
    assert net.fairness_violations() == [] and b.got == [("a", 0)]


def test_drop_only_faulty_senders_replay_and_delay_until():
    net = SyncNetwork(1.0)
    sim = Simulator(0, net)
    for i in "abc":
        sim.add_node(Gossip(i, []))
    net.drop_if(lambda env: True)
    net.mark_faulty("c")
    sim.send("a", "b", Ping(0, b""))  # correct link: never dropped
    sim.send("c", "b", Ping(0, b""))  # faulty sender: dropped
    sim.run()
    assert [src for src, _ in sim.node("b").got] == ["a"] and net.stats.dropped == 1
    net.replay(0, delay=0.5)
    sim.run()
    assert [src for src, _ in sim.node("b").got] == ["a", "a"] and net.stats.replayed == 1
    assert net.stats.count == {"PING": 2}  # replays are not protocol messages
    net.delay_until(lambda env: env.src == "b", sim.now + 0.8)
    sim.send("b", "a", Ping(0, b""))
    start = sim.now
    sim.run()
    assert sim.now - start >= 0.8


def test_send_to_unknown_node_raises():
    sim = Simulator(0, SyncNetwork(1.0))
    sim.add_node(Node("a"))
    with pytest.raises(UnknownParty, match="unknown node 'zz'"):
        sim.send("a", "zz", Ping(0, b""))
    with pytest.raises(SimulationError, match="already registered"):
        sim.add_node(Node("a"))


# -- crypto -------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["ed25519", "hmac"])
def test_signatures_verify_and_reject_tamper_and_replay(scheme):
    reg = KeyRegistry(seed=5, scheme=scheme)
    alice, bob = reg.enroll("alice"), reg.enroll("bob")
    st_ = Statement("psync", "DECISION", pid="p1", cid="c1", seq=3, decision="COMMIT",
                    state_hash=digest("s"))
    sig = alice.sign(st_)
    assert len(sig) == 64 and reg.verify("alice", st_, sig)
    assert sig == KeyRegistry(seed=5, scheme=scheme).enroll("alice").sign(st_)  # deterministic
    assert sig != KeyRegistry(seed=6, scheme=scheme).enroll("alice").sign(st_)
    assert not reg.verify("bob", st_, sig)  # wrong signer
    assert not reg.verify("carol", st_, sig)  # unknown party
    for other in (st_.replace(pid="p2"), st_.replace(cid="c2"), st_.replace(seq=4),
                  st_.replace(decision="ABORT"), st_.replace(phase="LOCK"),
                  st_.replace(protocol="sync"), st_.replace(state_hash=digest("t"))):
        assert not reg.verify("alice", other, sig)
    assert not reg.verify("alice", st_, bytes([sig[0] ^ 1]) + sig[1:])
    assert reg.verify("bob", st_, bob.sign(st_))
    with pytest.raises(CryptoError, match="already has a registered key"):
        reg.enroll("alice")


def test_encoding_is_typed_and_hashlock():
    assert encode(("1",)) != encode((1,)) != encode((b"1",))
    assert encode((("a", "b"),)) != encode(("a", "b")) and encode((True,)) != encode((1,))
    with pytest.raises(CryptoError, match="cannot canonically encode"):
        encode({1, 2})
    x, h = hashlock(b"seed")
    assert len(x) == len(h) == 32 and (x, h) == hashlock(b"seed")
    assert wire_size(h) == 32


@pytest.fixture(scope="module")
def bft4():
    reg = KeyRegistry(seed=1)
    com, signers = Committee.create("W", registry=reg, f=1)
    outsider = reg.enroll("outsider")
    return reg, com, signers, outsider


def test_qc_threshold_duplicates_and_non_members(bft4):
    reg, com, signers, outsider = bft4
    st_ = Statement("psync", "DECISION", pid="p", cid="c", decision="COMMIT")
    votes = [signers[m].vote(st_) for m in com.members]
    assert com.verify_qc(QuorumCertificate.from_votes(votes[:3]), reg)  # exactly 2f+1
    assert not com.verify_qc(QuorumCertificate.from_votes(votes[:2]), reg)  # 2f
    pairs = [(v.signer, v.signature) for v in votes]
    dup = QuorumCertificate(st_, (pairs[0], pairs[0], pairs[1]))
    assert dup.valid_signers(reg, com.members) == tuple(sorted(com.members[:2]))
    assert not com.verify_qc(dup, reg)
    with_outsider = QuorumCertificate.from_votes(votes[:2] + [outsider.vote(st_)])
    assert not com.verify_qc(with_outsider, reg)
    forged = QuorumCertificate(st_, tuple((v.signer, b"\0" * 64) for v in votes))
    assert not com.verify_qc(forged, reg)
    full = QuorumCertificate.from_votes(votes)
    assert com.verify_qc(full, reg)
    assert not com.verify_qc(QuorumCertificate(st_.replace(pid="other"), full.signatures), reg)
    with pytest.raises(CryptoError, match="same statement"):
        QuorumCertificate.from_votes([votes[0], signers[com.members[1]].vote(st_.replace(seq=1))])


@pytest.mark.parametrize("f", [2, 3])
def test_qc_exact_quorum_larger_committees(f):
    reg = KeyRegistry(seed=f, scheme="hmac")
    com, signers = Committee.create("W", registry=reg, f=f)
    st_ = Statement("psync", "LOCK", pid="p", cid="c")
    votes = [signers[m].vote(st_) for m in com.members]
    assert com.quorum == 2 * f + 1 and com.n == 3 * f + 1
    assert com.verify_qc(QuorumCertificate.from_votes(votes[: 2 * f + 1]), reg)
    assert not com.verify_qc(QuorumCertificate.from_votes(votes[: 2 * f]), reg)


def test_committee_constructors():
    with pytest.raises(ConfigError, match=r"n must be 3f\+1, got n=5"):
        Committee.bft([f"m{i}" for i in range(5)], f=1)
    with pytest.raises(ConfigError, match=r"n must be 3f\+1, got n=6"):
        Committee.bft([f"m{i}" for i in range(6)])
    assert Committee.bft([f"m{i}" for i in range(7)]).quorum == 5
    g = Committee.general(["a", "b", "c"], f=1, quorum=2)
    assert (g.n, g.f, g.quorum) == (3, 1, 2)
    with pytest.raises(ConfigError, match="duplicate members"):
        Committee.general(["a", "a"], f=0, quorum=1)
    with pytest.raises(ConfigError, match="quorum must be"):
        Committee.general(["a", "b"], f=0, quorum=3)


# -- members and behaviours ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Vote:
    kind = "VOTE"
    statement: Statement
    member: str
    sig: bytes


class Collector(Node):
    def __init__(self, node_id):
        super().__init__(node_id)
        self.votes = []

    def on_message(self, src, message):
        self.votes.append(SignedStatement(message.statement, message.member, message.sig))


class EchoMember(Member):
    """Votes the decision it is asked for (a correct member's local view) to x and y."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def on_message(self, src, message):
        self.seen.append(message)
        pid, decision = message
        st_ = Statement("psync", "DECISION", pid=pid, cid="c", decision=decision)
        self.vote_to(st_, ["x", "y"], Vote)


def committee_sim(behaviours):
    reg = KeyRegistry(seed=2, scheme="hmac")
    com, signers = Committee.create("W", registry=reg, f=1)
    sim = Simulator(0, SyncNetwork(1.0))
    members = [sim.add_node(EchoMember(m, signers[m], reg, b))
               for m, b in zip(com.members, behaviours, strict=True)]
    collectors = [sim.add_node(Collector("x")), sim.add_node(Collector("y"))]
    sim.add_node(Node("client"))
    return reg, com, sim, members, collectors


def test_correct_member_signs_one_statement_per_slot(bft4):
    reg, com, signers, _ = bft4
    m = Member(com.members[0], signers[com.members[0]], reg)
    commit = Statement("psync", "DECISION", pid="p", cid="c", decision="COMMIT")
    assert m.sign(commit) is not None and m.sign(commit) is not None
    assert m.sign(commit.replace(decision="ABORT")) is None
    assert m.sign(commit.replace(pid="q", decision="ABORT")) is not None


def test_equivocation_beyond_f_breaks_qc_uniqueness_and_is_detected():
    # f+1 = 2 equivocators of n = 4 (above the bound); the two correct members hold different
    # views (COMMIT vs ABORT), which alone is harmless.
    reg, com, sim, members, (x, y) = committee_sim([Equivocating(), Equivocating(), None, None])
    for m, decision in zip(members, ["COMMIT", "COMMIT", "COMMIT", "ABORT"], strict=True):
        sim.send("client", m.id, ("p1", decision))
    sim.run()
    # Equivocators send COMMIT to x (even index) and ABORT to y.
    commit_qc = QuorumCertificate.from_votes(v for v in x.votes if v.statement.decision == "COMMIT")
    abort_qc = QuorumCertificate.from_votes(v for v in y.votes if v.statement.decision == "ABORT")
    assert com.verify_qc(commit_qc, reg) and com.verify_qc(abort_qc, reg)
    found = check_qc_uniqueness([commit_qc, abort_qc, commit_qc], reg, {"c": com})
    assert [v.property for v in found] == ["qc_uniqueness"]
    votes = x.votes + y.votes
    assert check_no_equivocation(votes, com.members[2:], reg) == []
    flagged = check_no_equivocation(votes, com.members, reg)
    assert sorted(v.detail.split()[2] for v in flagged) == sorted(com.members[:2])


def test_single_equivocator_cannot_build_conflicting_qc():
    reg, com, sim, members, (x, y) = committee_sim([Equivocating(), None, None, None])
    for m in members:
        sim.send("client", m.id, ("p1", "COMMIT"))
    sim.run()
    aborts = [v for v in x.votes + y.votes if v.statement.decision == "ABORT"]
    assert len(aborts) == 1
    assert not com.verify_qc(QuorumCertificate.from_votes(aborts), reg)


def test_crashed_behaviours():
    reg, com, sim, members, (x, _) = committee_sim(
        [Crashed(at_time=5.0), Crashed(at_phase="DECISION"), None, None])
    early = ("p1", "COMMIT")
    sim.send("client", members[0].id, early)
    sim.send("client", members[1].id, early)
    sim.run()
    assert members[0].seen == [early] and members[1].seen == [early]
    assert sorted(v.signer for v in x.votes) == [members[0].id]  # phase crash never signed
    sim.schedule(10.0, lambda: sim.send("client", members[0].id, ("p2", "COMMIT")))
    sim.run()
    assert members[0].seen == [early] and not members[0].correct and members[2].correct


# -- registration and fraud proofs ---------------------------------------------------------------
def test_registration_acks_fraud_and_close(bft4):
    reg, com, signers, _ = bft4
    a, b = reg.enroll("reg_a"), reg.enroll("reg_b")
    stores = [RegistrationStore(m, signers[m], reg) for m in com.members]
    acks = []
    for seq in (1, 2, 3):
        h = digest("state", seq)
        st_ = state_statement("c9", seq, h)
        acks += [s.register("c9", ("reg_a", "reg_b"), seq, h, a.sign(st_), b.sign(st_))
                 for s in stores]
    assert all(ack.verify(reg) for ack in acks)
    old = state_statement("c9", 1, digest("state", 1))
    again = stores[0].register("c9", ("reg_a", "reg_b"), 1, digest("state", 1),
                               a.sign(old), b.sign(old))
    assert again.statement.seq == 3  # keeps the max and reports it
    new = state_statement("c9", 4, digest("x"))
    with pytest.raises(CryptoError, match="invalid signature of 'reg_b'"):
        stores[0].register("c9", ("reg_a", "reg_b"), 4, digest("x"), a.sign(new), b.sign(old))
    claims = [stores[0].claim("c9", at_seq=1)] + [s.claim("c9") for s in stores[1:3]]
    proofs = find_fraud(claims, acks)
    assert [p.member for p in proofs] == [com.members[0]] and proofs[0].verify(reg)
    decision = resolve_close("c9", claims, com, reg)
    assert decision.seq == 3 and decision.state_hash == digest("state", 3)
    with pytest.raises(PaymentError, match="needs 3 distinct valid member claims, got 2"):
        resolve_close("c9", claims[:2] + claims[:1], com, reg)


# -- channels -----------------------------------------------------------------------------------
def make_channel():
    return Channel.open("c1", "a", "b", 10, 6)


OPS = st.lists(st.tuples(st.sampled_from(["lock", "settle", "refund", "close"]),
                         st.integers(0, 4),  # lock id index: reuse gives duplicates/unknowns
                         st.sampled_from(["a", "b", "z"]),  # z: not an endpoint
                         st.integers(-3, 20),  # amounts incl. zero/negative/too large
                         st.booleans()),  # hash-locked / correct preimage
               max_size=40)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_channel_invariant_under_random_operations(ops):
    ch = make_channel()
    x, h = hashlock(b"pre")
    for op, k, payer, amount, flag in ops:
        before = ch.snapshot()
        try:
            if op == "lock":
                ch.lock(f"L{k}", payer, amount, hashlock=h if flag else None)
            elif op == "settle":
                ch.settle(f"L{k}", x if flag else b"wrong")
            elif op == "refund":
                ch.refund(f"L{k}")
            elif flag and k == 0:
                ch.close()
        except PaymentError as err:
            assert str(err)
            assert ch.snapshot() == before  # validate first, mutate after
        ch.check_invariant()
        assert sum(ch.balances.values()) + ch.locked_amount() == ch.capacity == 16
        assert min(ch.balances.values()) >= 0


BAD_INPUTS = [
    (lambda ch, g: ch.lock("L", "a", 11), InsufficientBalance, "insufficient balance of 'a'"),
    (lambda ch, g: ch.lock("L", "b", 17), InsufficientBalance, "exceeds capacity 16"),
    (lambda ch, g: ch.lock("L", "zed", 1), UnknownParty, "'zed' is not an endpoint"),
    (lambda ch, g: ch.lock("L", "a", 0), InvalidAmount, "must be positive, got 0"),
    (lambda ch, g: ch.lock("L", "a", -2), InvalidAmount, "must be positive, got -2"),
    (lambda ch, g: ch.lock("L", "a", 1.5), InvalidAmount, "must be an int"),
    (lambda ch, g: ch.lock("held", "a", 1), DuplicateLock, "'held' already used"),
    (lambda ch, g: ch.settle("nope"), UnknownLock, "'nope' on channel 'c1' is unknown"),
    (lambda ch, g: ch.settle("held", b"bad"), LockError, "wrong preimage"),
    (lambda ch, g: ch.settle("held", hashlock(b"k")[0], now=99.0), LockError, "expired"),
    (lambda ch, g: ch.close(at_seq=42), LockError, "no state with seq 42"),
    (lambda ch, g: g.channel("c404"), UnknownChannel, "unknown channel 'c404'"),
    (lambda ch, g: g.route_channels(("a", "b", "q")), ChannelClosed, "closed channel 'cq'"),
    (lambda ch, g: g.route_channels(("a", "ghost")), UnknownParty, "unknown party 'ghost'"),
    (lambda ch, g: g.path("a", "q", 1), NoRoute, "no route from 'a' to 'q'"),
    (lambda ch, g: g.path("a", "b", -1), InvalidAmount, "must be positive"),
]


@pytest.mark.parametrize("call,error,message", BAD_INPUTS)
def test_bad_input_raises_named_error_and_changes_nothing(call, error, message):
    g = ChannelGraph()
    ch = g.add_channel("a", "b", 10, 6, cid="c1")
    ch.lock("held", "a", 2, hashlock=hashlock(b"k")[1], deadline=50.0)
    g.add_channel("b", "q", 5, 5, cid="cq").close()
    before = g.snapshot()
    with pytest.raises(error, match=message):
        call(ch, g)
    assert g.snapshot() == before


def test_stale_close_restores_old_state():
    ch = make_channel()
    ch.lock("L1", "a", 4)
    ch.settle("L1")
    assert ch.close(at_seq=1) == {"a": 6, "b": 6} and ch.status("L1") == LOCKED
    ch.check_invariant()
    with pytest.raises(ChannelClosed, match="channel 'c1' is closed"):
        ch.lock("L2", "a", 1)
    ch.refund("L1")  # disputes may still resolve pending locks after close
    assert ch.balances == {"a": 10, "b": 6} and ch.status("L1") == REFUNDED


def test_graph_paths_and_random_graph():
    g = ChannelGraph()
    g.add_channel("s", "i", 10, 0)
    g.add_channel("i", "r", 3, 0)
    g.add_channel("s", "j", 10, 0)
    g.add_channel("j", "r", 10, 0)
    g.add_channel("s", "k", 10, 0)
    assert g.path("s", "r", 2) == ("s", "i", "r")
    assert g.path("s", "r", 5) == ("s", "j", "r")  # i-r lacks balance
    with pytest.raises(NoRoute):
        g.path("r", "s", 1)  # all balance sits on the s side
    g.channel("c3").close()
    with pytest.raises(NoRoute):
        g.path("s", "r", 5)
    r1 = ChannelGraph.random_graph(30, 45, seed=3, capacity=(10, 20))
    assert r1.snapshot() == ChannelGraph.random_graph(30, 45, seed=3, capacity=(10, 20)).snapshot()
    assert r1.snapshot() != ChannelGraph.random_graph(30, 45, seed=4, capacity=(10, 20)).snapshot()
    seen, todo = {"p0"}, ["p0"]
    while todo:
        for v, _ in r1.adjacency[todo.pop()]:
            if v not in seen:
                seen.add(v)
                todo.append(v)
    assert len(seen) == 30 and len(r1.channels) == 45
    assert all(10 <= ch.capacity <= 20 for ch in r1.channels.values())
    with pytest.raises(ConfigError, match="n_channels must be in"):
        ChannelGraph.random_graph(10, 5, seed=0)
    assert hop_amounts(100, [3, 2]) == (105, 102, 100)


# -- checkers -----------------------------------------------------------------------------------
def two_hop(outcomes, honest=("s", "i", "r")):
    return PaymentRecord("p1", ("s", "i", "r"), ("c1", "c2"), (11, 10),
                         honest=frozenset(honest), outcomes=list(outcomes))


def test_checkers_pass_on_correct_records():
    for outcomes in ([SETTLED, SETTLED], [REFUNDED, REFUNDED], [ABSENT, ABSENT]):
        rec = two_hop(outcomes)
        assert check_atomicity([rec]) == check_balance_security([rec]) == []
        assert check_termination([rec]) == []


def test_checkers_detect_hand_made_violations():
    half = two_hop([SETTLED, REFUNDED])
    assert [v.property for v in check_atomicity([half])] == ["atomicity"]
    sec = check_balance_security([half])
    assert any("honest sender s paid but receiver r was not paid" in v.detail for v in sec)
    robbed = two_hop([REFUNDED, SETTLED])  # intermediary paid r but was not paid
    found = check_balance_security([robbed])
    assert [v.detail for v in found] == ["payment p1: honest i (u_1) lost 10"]
    assert check_balance_security([two_hop([REFUNDED, SETTLED], honest=("s", "r"))]) == []
    # A hop through a faulty channel with no honest endpoint is outside atomicity.
    rec = PaymentRecord("p2", ("s", "x", "y", "r"), ("c1", "c2", "c3"), (12, 11, 10),
                        honest=frozenset({"s", "r"}), outcomes=[SETTLED, REFUNDED, SETTLED],
                        correct_channels=frozenset({"c1", "c3"}))
    assert check_atomicity([rec]) == []
    assert [v.property for v in check_termination([two_hop([SETTLED, LOCKED])])] == [
        "termination"]
    with pytest.raises(PaymentError, match="amounts must not increase"):
        PaymentRecord("p", ("s", "i", "r"), ("c1", "c2"), (10, 11))


def test_checkers_on_a_real_ledger():
    g = ChannelGraph()
    g.add_channel("s", "i", 50, 50, cid="c1")
    g.add_channel("i", "r", 50, 50, cid="c2")
    total, before = g.total_funds(), g.holdings()
    rec = two_hop([ABSENT, ABSENT])
    x, h = hashlock(b"invoice")
    for i, (cid, payer) in enumerate(zip(rec.channels, rec.parties, strict=False)):
        g.channel(cid).lock(rec.lock_ids[i], payer, rec.amounts[i], pid="p1", hashlock=h,
                            deadline=10.0 * (2 - i))
        rec.outcomes[i] = LOCKED
    assert check_termination(graph=g, honest=["s", "i", "r"], now=5.0) == []
    late = check_termination(graph=g, honest=["i"], now=21.0)
    assert [v.property for v in late] == ["termination"] * 2
    assert [v.property for v in check_termination(graph=g, honest=["i"], now=15.0)] == [
        "termination"]
    g.channel("c2").settle("p1/2", x, now=5.0)
    assert check_record_consistency([rec], g)[0].property == "record"
    assert [v.property for v in check_atomicity([rec], g)] == ["atomicity"]  # mid-flight
    g.channel("c1").settle("p1/1", x)
    rec.outcomes[:] = [SETTLED, SETTLED]
    assert check_record_consistency([rec], g) == []
    assert check_atomicity([rec], g) == check_balance_security([rec], g, before) == []
    assert check_conservation(g, total) == [] and check_termination([rec], g, ["s"]) == []
    assert g.holdings()["i"] - before["i"] == 1  # the fee
    g.channel("c1").balances["s"] += 1  # tamper with the ledger
    assert {v.property for v in check_conservation(g, total)} == {"conservation"}
    g.channel("c1").balances["i"] -= 2
    lost = check_balance_security([rec], g, before)
    assert [v.detail for v in lost] == ["honest i: holdings changed by -1, payments account for 1"]


def test_channel_safety_flags_stale_close(bft4):
    reg, com, signers, _ = bft4
    a, b = reg.enroll("cs_a"), reg.enroll("cs_b")
    g = ChannelGraph()
    ch = g.add_channel("cs_a", "cs_b", 5, 5, cid="cs")
    acks = []
    for k in range(3):
        ch.lock(f"L{k}", "cs_a", 1)
        st_ = state_statement("cs", ch.seq, ch.state_hash())
        for m in com.members[:2]:  # f+1 = 2 honest members registered every state
            store = RegistrationStore(m, signers[m], reg)
            acks.append(store.register("cs", ("cs_a", "cs_b"), ch.seq, ch.state_hash(),
                                       a.sign(st_), b.sign(st_)))
    stale = dataclasses.replace(ch, history=list(ch.history))
    g.channels["cs_stale"] = stale
    ch.close()
    stale.close(at_seq=1)
    committees = {"cs": com, "cs_stale": com}
    stale_acks = [SignedStatement(x.statement.replace(cid="cs_stale"), x.signer,
                                  signers[x.signer].sign(x.statement.replace(cid="cs_stale")))
                  for x in acks]
    found = check_channel_safety(g, acks + stale_acks, committees, com.members, reg)
    assert [v.detail for v in found] == ["channel cs_stale closed at seq 1 < registered seq 3"]
    # Byzantine-only ACKs do not bind; neither do ACKs short of the honest quorum.
    assert check_channel_safety(g, stale_acks, committees, com.members[2:], reg) == []
    assert check_channel_safety(g, stale_acks[::2], committees, com.members, reg) == []


def test_importing_payments_does_not_import_jax():
    code = (
        "import sys; import decjax.payments; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'numpy')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
