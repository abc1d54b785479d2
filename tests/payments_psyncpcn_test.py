"""PSyncPCN: asynchronous multi-hop payments with committees of 3f+1 members."""

import dataclasses
import random

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from decjax.payments.channels import ABSENT, REFUNDED, SETTLED, hop_amounts
from decjax.payments.committee import Crashed, Equivocating
from decjax.payments.errors import (
    ChannelClosed,
    ConfigError,
    InsufficientBalance,
    LockError,
    PaymentError,
    UnknownParty,
)
from decjax.payments.graph import ChannelGraph
from decjax.payments.network import RandomScheduler
from decjax.payments.psyncpcn import (
    Adversary,
    FixedDelay,
    PaymentSpec,
    PsyncSimulation,
    check_delegation,
    message_formula,
    run_psyncpcn,
)


def line_graph(hops, bal=50, cids=None):
    g = ChannelGraph()
    parties = tuple(f"u{k}" for k in range(hops + 1))
    for k, (a, b) in enumerate(zip(parties, parties[1:], strict=False)):
        g.add_channel(a, b, bal, bal, cid=cids[k] if cids else f"c{k + 1}")
    return g, parties


def pay(parties, value=10, fee=1, start=0.0):
    return PaymentSpec(parties, value, (fee,) * (len(parties) - 2), start)


def props(run):
    return sorted({v.property for v in run.check()})


# -- happy path, message counts, latency ----------------------------------------------------------
@pytest.mark.parametrize("hops", [1, 2, 3, 4])
def test_happy_path_counts_and_latency(hops):
    g, parties = line_graph(hops)
    before = g.holdings()
    run = run_psyncpcn(g, [pay(parties)], seed=hops, scheduler=FixedDelay(), signer="ed25519")
    assert run.status == ["committed"] and run.check() == []
    assert run.records[0].outcomes == [SETTLED] * hops
    after = g.holdings()
    assert after["u0"] - before["u0"] == -(10 + hops - 1) and after[parties[-1]] - before[
        parties[-1]] == 10
    assert all(after[p] - before[p] == 1 for p in parties[1:-1])  # each intermediary: its fee
    n = 4
    expected = {k: v for k, v in message_formula(hops, n).items() if v}
    assert run.stats.count == expected
    assert run.stats.total_messages == 2 * hops + n + 2 * (hops - 1) * n * n + 2 * hops * n
    (lat,) = run.latency.values()
    assert lat.delays == 2 * hops + 1 and lat.time == 2 * hops + 1
    # One signature per vote message: every LOCK/DECISION message has the same size.
    for kind in ("LOCK", "DECISION"):
        if kind in run.stats.count:
            assert run.stats.bytes[kind] % run.stats.count[kind] == 0


@pytest.mark.parametrize("f", [1, 2])
@pytest.mark.parametrize("abort_at", [1, 2, 3])
def test_abort_at_first_committee_that_cannot_lock(f, abort_at):
    g, parties = line_graph(3)
    ch = g.channel(f"c{abort_at}")
    payer = parties[abort_at - 1]
    ch.balances[payer], ch.balances[ch.counterparty(payer)] = 5, 95  # cannot lock a_i >= 10
    run = run_psyncpcn(g, [pay(parties)], seed=0, f=f, scheduler=FixedDelay(), signer="hmac")
    assert run.status == ["aborted"] and run.check() == []
    assert run.records[0].outcomes == [REFUNDED] * (abort_at - 1) + [ABSENT] * (4 - abort_at)
    expected = {k: v for k, v in message_formula(3, 3 * f + 1, abort_at).items() if v}
    assert run.stats.count == expected
    assert not any(c.locks for c in g.channels.values())


def test_same_seed_same_trace():
    def trace(seed):
        g, parties = line_graph(3)
        adv = Adversary(members={("c2", 0): Equivocating()}, replays=5, cross_replays=5)
        return run_psyncpcn(g, [pay(parties), pay(parties, 3, 0, 0.5)], seed=seed,
                            adversary=adv, signer="hmac").trace

    assert trace(3) == trace(3) and trace(3) != trace(4)


def test_delayed_committee_waits_and_stays_safe():
    class SlowW2:
        def delay(self, env, net):
            return 1000.0 if env.src.startswith("W.c2.") else 1.0

    g, parties = line_graph(2)
    run = run_psyncpcn(g, [pay(parties)], seed=0, scheduler=SlowW2(), signer="hmac")
    assert run.status == ["committed"] and run.check() == []
    assert list(run.latency.values())[0].time > 1000


def test_concurrent_payments_compete_for_balance():
    g, parties = line_graph(2, bal=15)
    run = run_psyncpcn(g, [pay(parties, 10, 0), pay(parties, 10, 0, start=0.25)], seed=1,
                       scheduler=FixedDelay(), signer="hmac")
    assert sorted(run.status) == ["aborted", "committed"] and run.check() == []


# -- faults within the bound ----------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: Crashed(), lambda: Crashed(at_phase="LOCK"), lambda: Crashed(at_phase="DECISION"),
    lambda: Equivocating(), lambda: Crashed(at_time=4.5)])
@pytest.mark.parametrize("f", [1, 2])
def test_up_to_f_faulty_members_per_committee(make, f):
    g, parties = line_graph(3)
    members = {(cid, k): make() for cid in g.channels for k in range(f)}
    run = run_psyncpcn(g, [pay(parties)], seed=f, f=f, adversary=Adversary(members=members),
                       signer="hmac")
    assert run.status == ["committed"] and run.check() == []


@pytest.mark.parametrize("party,mode,status,outcomes", [
    ("u0", "silent", "not_started", [ABSENT] * 3),
    ("u2", "silent", "not_started", [ABSENT] * 3),
    ("u3", "silent", "not_started", [ABSENT] * 3),
    ("u1", "lying", "refused", [ABSENT] * 3),
    ("u3", "lying", "refused", [ABSENT] * 3),
    ("u0", "lying", "aborted", [ABSENT] * 3),
    ("u0", "forger", "aborted", [REFUNDED, REFUNDED, ABSENT]),
    ("u1", "mute", "committed", [SETTLED] * 3),
    ("u3", "mute", "committed", [SETTLED] * 3),
    ("u2", "forger", "committed", [SETTLED] * 3),
])
def test_silent_and_lying_endpoints(party, mode, status, outcomes):
    g, parties = line_graph(3)
    snap = g.snapshot()
    run = run_psyncpcn(g, [pay(parties)], seed=0, adversary=Adversary(parties={party: mode}),
                       signer="hmac")
    assert run.status == [status] and run.records[0].outcomes == outcomes
    assert run.check() == []
    if status in ("not_started", "refused"):
        assert g.snapshot() == snap  # stalled before anything was locked


def test_colluding_intermediaries_cannot_skip_or_block():
    g, parties = line_graph(4)
    adv = Adversary(parties={"u1": "forger", "u3": "forger"}, cross_replays=20, replays=20)
    run = run_psyncpcn(g, [pay(parties)], seed=5, adversary=adv, signer="hmac")
    assert run.status == ["committed"] and run.check() == []


# -- beyond the bound: f+1 faulty members ---------------------------------------------------------
def two_hop_with(members, split=None):
    g, parties = line_graph(2)
    adv = Adversary(members=members, split=split or {})
    return run_psyncpcn(g, [pay(parties)], seed=0, adversary=adv, signer="hmac")


def test_f_plus_1_equivocators_with_split_registration_break_qc_uniqueness():
    run = two_hop_with({("c2", 0): Equivocating(), ("c2", 1): Equivocating()}, {"c2": (3,)})
    pid = run.records[0].pid
    details = {v.detail for v in run.check()}
    assert f"payment {pid!r} channel c2: valid COMMIT-QC and ABORT-QC" in details
    assert f"payment {pid}: hops [2] settled, outcomes ['locked', 'settled']" in details
    assert f"payment {pid}: honest u1 (u_1) lost 10" in details
    assert props(run) == ["atomicity", "balance_security", "qc_uniqueness", "termination"]
    assert run.records[0].correct_channels == frozenset({"c1"})


def test_f_plus_1_equivocators_alone_starve_upstream_but_forge_no_qc():
    # Correct members of W_2 agree (COMMIT), so no ABORT-QC exists; but the flipped votes keep
    # half of W_1 from a quorum: c2 settles while c1 stays locked.
    run = two_hop_with({("c2", 0): Equivocating(), ("c2", 1): Equivocating()})
    assert props(run) == ["atomicity", "balance_security", "termination"]
    assert run.status == ["pending"] and run.records[0].outcomes == ["locked", "settled"]


def test_f_plus_1_crashed_members_block_forever():
    run = two_hop_with({("c2", 0): Crashed(), ("c2", 1): Crashed()})
    assert props(run) == ["termination"] and run.records[0].outcomes == ["locked", "locked"]


def test_split_needs_more_than_f_faulty():
    with pytest.raises(ConfigError, match="needs >= f\\+1 = 2 faulty"):
        two_hop_with({("c2", 0): Equivocating()}, {"c2": (3,)})


def test_delegation_checker_flags_release_without_downstream_qc():
    g, parties = line_graph(2)
    run = run_psyncpcn(g, [pay(parties)], seed=0, signer="hmac")
    assert check_delegation(run) == []
    forged = [r[:3] + ("ABORT",) + r[4:] if r[2] == 0 else r for r in run.resolutions]
    found = check_delegation(dataclasses.replace(run, resolutions=forged))
    assert [v.property for v in found] == ["delegation"]


# -- close, bad input ----------------------------------------------------------------------------
def test_close_refused_while_pending():
    g, parties = line_graph(2)
    sim = PsyncSimulation(g, [pay(parties)], seed=0, scheduler=FixedDelay(), signer="hmac")
    sim.run(until=3.5)  # W_1 locked at t=3, the decision is still under way
    with pytest.raises(LockError, match="cannot close channel 'c1': payment"):
        sim.close_channel("c1")
    sim.run()
    assert sim.result().status == ["committed"] and sim.close_channel("c1")
    assert not g.channel("c1").is_open


@pytest.mark.parametrize("kwargs,spec,error,match", [
    ({"n": 5}, None, ConfigError, r"n must be 3f\+1, got n=5"),
    ({}, ("u0", "u1", "u2"), InsufficientBalance, "exceeds capacity 100"),
    ({}, ("u0", "ghost"), UnknownParty, "unknown party 'ghost'"),
    ({}, ("u0", "u1", "x"), ChannelClosed, "closed channel 'cx'"),
    ({}, ("u0", "u1", "u0"), PaymentError, "distinct parties"),
    ({"adversary": Adversary(parties={"u0": "sneaky"})}, None, ConfigError, "unknown mode"),
    ({"adversary": Adversary(parties={"mallory": "silent"})}, None, UnknownParty,
     r"adversary names unknown parties \['mallory'\]"),
    ({"adversary": Adversary(members={("c9", 0): Crashed()})}, None, ConfigError,
     r"adversary names unknown channels \['c9'\]"),
    ({"adversary": Adversary(split={"c7": [0, 1]})}, None, ConfigError,
     r"adversary names unknown channels \['c7'\]"),
    ({"adversary": Adversary(members={("c1", 4): Crashed()})}, None, ConfigError,
     r"committee members \[\('c1', 4\)\] that do not exist: members are 0..3"),
])
def test_bad_input_raises_and_changes_nothing(kwargs, spec, error, match):
    g, parties = line_graph(2)
    g.add_channel("u1", "x", 5, 5, cid="cx").close()
    snap = g.snapshot()
    value = 500 if spec == ("u0", "u1", "u2") else 10
    with pytest.raises(error, match=match):
        run_psyncpcn(g, [PaymentSpec(spec or parties, value)], seed=0, signer="hmac", **kwargs)
    assert g.snapshot() == snap


# -- property tests ------------------------------------------------------------------------------
BEHAVIOURS = [lambda r: Crashed(), lambda r: Crashed(at_phase="LOCK"),
              lambda r: Crashed(at_phase="DECISION"), lambda r: Equivocating(),
              lambda r: Crashed(at_time=r.uniform(0, 12))]
MODES = ["honest"] * 6 + ["silent", "lying", "mute", "forger"]


class Shuffle:
    """Adversarial order: most messages fast, a seeded fraction very late (still finite)."""

    def __init__(self, late):
        self.late = late

    def delay(self, env, net):
        return net.rng.uniform(50, 500) if net.rng.random() < self.late else net.rng.random()


def random_walk(g, rng, hops):
    path = [rng.choice(g.parties)]
    for _ in range(hops):
        nxt = [v for v, cid in g.adjacency[path[-1]] if v not in path]
        if not nxt:
            break
        path.append(rng.choice(sorted(nxt)))
    return tuple(path)


@st.composite
def scenarios(draw, f):
    rng = random.Random(draw(st.integers(0, 2**32)))
    n_parties = draw(st.integers(3, 6))
    max_edges = min(n_parties + 2, n_parties * (n_parties - 1) // 2)
    g = ChannelGraph.random_graph(n_parties, draw(st.integers(n_parties - 1, max_edges)),
                                  seed=rng.randrange(10**6), capacity=(10, 60))
    specs = []
    for _ in range(draw(st.integers(1, 3))):
        path = random_walk(g, rng, draw(st.integers(1, 3)))
        if len(path) >= 2:
            fees = tuple(rng.randint(0, 2) for _ in path[2:])
            value = rng.randint(1, 8)
            caps = [ch.capacity for ch in g.route_channels(path)]
            if all(a <= c for a, c in zip(hop_amounts(value, fees), caps, strict=True)):
                specs.append(PaymentSpec(path, value, fees, rng.uniform(0, 3)))
    members = {}
    for cid in g.channels:
        for k in rng.sample(range(3 * f + 1), draw(st.integers(0, f))):
            members[(cid, k)] = rng.choice(BEHAVIOURS)(rng)
    parties = {p: rng.choice(MODES) for p in g.parties}
    adv = Adversary(members, parties, replays=draw(st.integers(0, 8)),
                    cross_replays=draw(st.integers(0, 8)))
    scheduler = draw(st.sampled_from([RandomScheduler(), RandomScheduler(5.0, 0.8),
                                      Shuffle(0.1), Shuffle(0.5)]))
    return g, specs, adv, scheduler, draw(st.integers(0, 10**6))


def check_scenario(f, scenario):
    g, specs, adv, scheduler, seed = scenario
    run = run_psyncpcn(g, specs, seed=seed, f=f, adversary=adv, scheduler=scheduler,
                       signer="hmac")
    assert run.check() == []
    assert not any(ch.locks for ch in g.channels.values())  # every lock resolved
    assert set(run.status) <= {"committed", "aborted", "not_started", "refused"}
    for status in run.status:
        event(status)
    event(f"faulty members: {bool(adv.members)}")
    for status, rec in zip(run.status, run.records, strict=True):
        if set(rec.parties) <= set(run.honest):
            assert status in ("committed", "aborted")


PROPERTY = settings(max_examples=1500, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(scenarios(1))
def test_property_f1_safe_and_terminating(scenario):
    check_scenario(1, scenario)


@settings(PROPERTY, max_examples=500)
@given(scenarios(2))
def test_property_f2_safe_and_terminating(scenario):
    check_scenario(2, scenario)


def test_votes_replayed_under_another_payment_or_channel_are_rejected():
    g, parties = line_graph(3)
    sim = PsyncSimulation(g, [pay(parties), pay(parties, 3, 0)], seed=0, scheduler=FixedDelay(),
                          signer="hmac")
    sim.run()
    other = sim.routes[1]
    lock_votes = [e for e in sim.sim.network.history
                  if e.kind == "LOCK" and e.message.signed.route.pid == sim.routes[0].pid]
    env = lock_votes[0]
    dst = sim.sim.node(env.dst)
    moved = dataclasses.replace(env.message, signed=dataclasses.replace(env.message.signed,
                                                                        route=other))
    w3 = sim.sim.node("W.c3.m0")
    before = ({k: dict(v) for k, v in dst.lock_votes.items()},
              {k: dict(v) for k, v in w3.lock_votes.items()})
    dst.receive(env.src, moved)  # statement is bound to the first pid: ignored
    w3.receive(env.src, env.message)  # LOCK-QC_1 vote sent to W_3: ignored
    dst.receive("u0", env.message)  # wrong sender on an authenticated link: ignored
    sim.run()
    assert (dst.lock_votes, w3.lock_votes) == before
    run = sim.result()
    assert run.status == ["committed", "committed"] and run.check() == []
