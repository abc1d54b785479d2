"""SyncPCN: optimistic cost, adversaries within and beyond the fault bound, privacy, inputs."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decjax.payments import (
    REFUNDED,
    SETTLED,
    ChannelClosed,
    ChannelGraph,
    ConfigError,
    Crashed,
    CryptoError,
    Equivocating,
    InsufficientBalance,
    InvalidAmount,
    LockError,
    NoRoute,
    UnknownParty,
)
from decjax.payments.syncpcn import (
    Adversary,
    BadOnion,
    Colluding,
    Griefer,
    LateClaimer,
    NoFee,
    RefundCheater,
    Replayer,
    ShortDeadlines,
    Silent,
    Stingy,
    SyncParams,
    WormholeEnd,
    WormholeStart,
    flip_verdict,
    member_id,
    optimistic_messages,
    run_syncpcn,
)
from decjax.payments.syncpcn.privacy import (
    ONION_BYTES,
    RFC3526_2048,
    SIM_GROUP,
    HopPayload,
    OnionKeys,
    PerHopLocks,
    SingleHashLock,
    build_onion,
    peel_onion,
)

DELTA = 1.0
EXACT = Adversary(delay=lambda env: DELTA)


def line(hops, bal=100):
    g = ChannelGraph()
    for i in range(hops):
        g.add_channel(f"u{i}", f"u{i + 1}", bal, bal, cid=f"c{i}")
    return g


def pay(hops, adversary=None, *, value=10, seed=3, signer="hmac", **kw):
    g = line(hops)
    return run_syncpcn(g, [("u0", f"u{hops}", value)], seed=seed, signer=signer,
                       adversary=adversary, **kw)


def props(run, **kw):
    return sorted({v.property for v in run.violations(**kw)})


def net(run, party):
    return run.graph.holdings()[party] - run.before[party]


# -- optimistic case ----------------------------------------------------------------------------
@pytest.mark.parametrize("hops", [1, 2, 3, 4])
def test_happy_path_amounts_messages_latency(hops):
    run = pay(hops, EXACT, signer="ed25519")
    rec = run.records[0]
    assert rec.outcomes == [SETTLED] * hops and run.violations() == []
    assert net(run, f"u{hops}") == 10 and net(run, "u0") == -rec.amounts[0] == -(10 + hops - 1)
    assert all(net(run, f"u{k}") == rec.fee(k) == 1 for k in range(1, hops))
    n = 4
    # INVOICE + per hop 2 updates x (ADD|FULFILL, COSIGN, n REGISTER, n ACK) = 1 + 2l(k_u + 2n).
    assert run.stats.total_messages == optimistic_messages(hops, n) == 1 + 2 * hops * (2 + 2 * n)
    assert run.stats.count == {"INVOICE": 1, "ADD": hops, "FULFILL": hops, "COSIGN": 2 * hops,
                               "REGISTER": 2 * n * hops, "ACK": 2 * n * hops}
    # Invoice Δ, per hop ADD + REGISTER + ACK = 3Δ, then one FULFILL per hop back: (4l + 1)Δ.
    assert run.latency["pay0"] == pytest.approx((4 * hops + 1) * DELTA)
    assert run.stats.bytes["ADD"] > hops * ONION_BYTES


@pytest.mark.parametrize("f", [1, 2])
def test_message_count_scales_with_committee_and_crashes_only_drop_acks(f):
    n = 3 * f + 1
    crashed = {member_id("c1", k): Crashed() for k in range(f)}
    run = pay(3, Adversary(members=crashed), committee_f=f)
    assert run.records[0].outcomes == [SETTLED] * 3 and run.violations() == []
    assert run.stats.count["REGISTER"] == 2 * 3 * n
    assert run.stats.total_messages == optimistic_messages(3, n) - 2 * f


def test_same_seed_same_trace():
    g1, g2, g3 = (ChannelGraph.random_graph(6, 8, seed=1, capacity=(200, 400)) for _ in range(3))
    payments = [("p0", "p5", 7), ("p3", "p1", 4), ("p2", "p4", 9)]
    runs = [run_syncpcn(g, payments, seed=s, signer="ed25519")
            for g, s in ((g1, 5), (g2, 5), (g3, 6))]
    assert runs[0].trace == runs[1].trace and runs[0].trace != runs[2].trace
    assert g1.snapshot() == g2.snapshot()
    assert runs[0].latency == runs[1].latency and runs[0].violations() == []


# -- adversarial endpoints and intermediaries ---------------------------------------------------
def test_silent_payer_forces_dispute_and_honest_payee_wins():
    run = pay(3, Adversary(parties={"u1": Stingy()}))
    assert run.records[0].outcomes == [SETTLED] * 3 and run.violations() == []
    assert run.stats.count["CLAIM"] == 4 and run.stats.count["VERDICT"] == 8  # n claims, 2n
    assert any(r.basis == "verdict" and r.cid == "c1" for r in run.resolutions)


@pytest.mark.parametrize("behaviour", [Griefer(), Silent(), LateClaimer(0.2)])
def test_griefing_or_silent_receiver_refunds_every_hop_by_the_deadlines(behaviour):
    run = pay(3, Adversary(parties={"u3": behaviour}, delay=lambda env: DELTA))
    assert run.violations() == []
    assert set(run.records[0].outcomes) <= {REFUNDED, "absent"}
    hop1 = run.hops.get("pay0", [None])[0]
    if hop1 is not None and hop1.locked_at is not None:  # REFUND at T_1 + Δ, verdicts 2Δ later
        assert hop1.resolved_at <= hop1.deadline + 3 * DELTA
        assert run.lock_time["pay0"] <= hop1.deadline - hop1.locked_at + 3 * DELTA


@pytest.mark.parametrize("eps", [0.01, 0.3, 0.6, 0.9])
@pytest.mark.parametrize("seed", range(4))
def test_claim_just_before_deadline_never_hurts_honest_parties(eps, seed):
    run = pay(3, Adversary(parties={"u3": LateClaimer(eps)}), seed=seed)
    assert run.violations() == []
    assert len(set(run.records[0].outcomes)) == 1  # all settled or all refunded


@pytest.mark.parametrize("behaviour", [BadOnion(), ShortDeadlines(), NoFee()])
def test_bad_sender_packets_are_rejected_before_locking(behaviour):
    run = pay(3, Adversary(parties={"u0": behaviour}))
    assert run.records[0].outcomes == ["absent"] * 3 and run.violations() == []
    assert run.parties["u1"].rejected == 1 and run.graph.holdings() == run.before


@pytest.mark.parametrize("who", ["u0", "u1"])
def test_refund_after_settlement_is_rejected(who):
    run = pay(3, Adversary(parties={who: RefundCheater()}))
    assert run.records[0].outcomes == [SETTLED] * 3 and run.violations() == []
    assert run.stats.count["REFUND"] == 4  # asked, refused by every member
    assert all(k != "REFUNDED" for w in run.members.values() for k, _, _ in w.log)


def test_replayed_messages_change_nothing():
    base = pay(2)
    for at in (4.0, 40.0):
        run = pay(2, Adversary(hooks=[Replayer(at)]))
        assert run.violations() == [] and run.graph.snapshot() == base.graph.snapshot()
        assert run.sim.network.stats.replayed > 0
        assert sum(w.rejected for w in run.members.values()) > 0


@pytest.mark.parametrize("private", [True, False])
def test_wormhole_cannot_steal_fees_with_per_hop_locks(private):
    adv = Adversary(parties={"u1": WormholeStart(), "u3": WormholeEnd("u1")})
    run = pay(4, adv, params=SyncParams(private=private))
    colluders = net(run, "u1") + net(run, "u3")
    assert net(run, "u4") == 10 and net(run, "u2") == 0 and run.violations() == []
    if private:  # u1 cannot derive its preimage without u2's tweak: S is refunded, u3 paid R
        assert net(run, "u0") == 0 and colluders == -10
        assert run.parties["u0"].rejected >= 1  # the wormhole FULFILL failed verification
    else:  # one hash on every hop: u1 settles with S directly and keeps u2's fee
        assert net(run, "u0") == -13 and colluders == 3 > 2
        assert props(run, atomicity=True) == ["atomicity"]


# -- committees: up to f faults, then beyond ----------------------------------------------------
def test_faulty_members_within_bound():
    members = {member_id("c0", 0): Crashed(at_phase="VERDICT"),
               member_id("c1", 1): Equivocating(flip_verdict),
               member_id("c2", 3): Colluding(claims=True, refunds=True)}
    for parties in ({"u0": Stingy(), "u2": RefundCheater()}, {"u3": LateClaimer(0.1)}):
        run = pay(3, Adversary(parties=parties, members=members))
        assert run.violations() == []


def test_f_plus_one_members_refusing_a_valid_claim_hurt_the_intermediary():
    bad = Colluding(claims=False, refunds=True)
    members = {member_id("c0", k): bad for k in range(2)}  # f + 1 = 2 of n = 4
    run = pay(2, Adversary(parties={"u0": RefundCheater()}, members=members))
    assert run.records[0].outcomes == ["locked", SETTLED]
    found = run.violations()
    assert "payment pay0: honest u1 (u_1) lost 10" in [v.detail for v in found]
    assert {v.property for v in found} == {"balance_security", "atomicity", "termination"}


def test_f_plus_one_crashed_members_block_registration_and_refund():
    crashed = {member_id("c1", k): Crashed() for k in range(2)}  # 2 live < q_s = q_c = 3
    run = pay(3, Adversary(members=crashed))
    assert run.records[0].outcomes == [REFUNDED, "locked", "absent"]
    assert props(run) == ["termination"]
    assert run.records[0].correct_channels == frozenset({"c0", "c2"})


def test_whole_faulty_committee_refunds_a_claimed_lock():
    members = {member_id("c0", k): Colluding(claims=False, refunds=True) for k in range(4)}
    run = pay(2, Adversary(parties={"u0": RefundCheater()}, members=members))
    assert run.records[0].outcomes == [REFUNDED, SETTLED]
    assert props(run) == ["atomicity", "balance_security"]


def test_faulty_committee_signing_a_late_claim_is_caught_by_the_deadline_check():
    members = {member_id("c1", k): Colluding(claims=True, refunds=False) for k in range(4)}
    adv = Adversary(parties={"u2": LateClaimer(-2.9)}, members=members,
                    delay=lambda env: DELTA)
    run = pay(2, adv)
    assert run.records[0].outcomes == [REFUNDED, SETTLED]
    found = run.violations()
    assert {v.property for v in found} >= {"balance_security", "deadline"}
    assert any("honest payer u1 paid but learnt the preimage" in v.detail for v in found)


# -- closing ------------------------------------------------------------------------------------
def test_stale_close_closes_at_latest_registered_state_with_fraud_proof():
    members = {member_id("c0", 2): Colluding(claims=None, refunds=None, stale_close=True)}
    run = pay(2, Adversary(members=members))
    ch = run.graph.channel("c0")
    balances = dict(ch.balances)
    result = run.close_unilateral("c0", by="u0", at_seq=1)  # u0 presents the locked state
    assert result.seq == ch.closed_seq == run.sessions["c0"].latest.seq > 1
    assert ch.balances == balances and run.violations() == []
    assert [p.member for p in result.fraud] == [member_id("c0", 2)]
    assert run.close_cooperative("c1") == run.graph.channel("c1").balances


def test_unilateral_close_applies_verdict_resolutions_and_cooperative_needs_no_locks():
    run = pay(2, Adversary(parties={"u0": Stingy()}))  # hop 1 settled by verdicts only
    ch = run.graph.channel("c0")
    before = dict(ch.balances)
    run.close_unilateral("c0", by="u1")
    assert ch.balances == before and run.violations() == []
    errors = []

    def try_close(r):
        try:
            r.close_cooperative("c0")
        except LockError as err:
            errors.append(str(err))

    hook = lambda r: r.sim.schedule_at(3.0, lambda: try_close(r))  # while c0 is locked
    run = pay(2, Adversary(parties={"u2": Griefer()}, hooks=[hook]))
    assert errors and "needs no pending locks" in errors[0] and run.violations() == []
    assert run.graph.channel("c0").is_open


# -- privacy ------------------------------------------------------------------------------------
def test_optimistic_views_and_per_hop_locks_are_private():
    run = pay(4)
    assert run.privacy_violations() == []
    conds = [h.cond for h in run.hops["pay0"]]
    assert len(set(conds)) == 4 and len(set(run.records[0].lock_ids)) == 4
    members = [w.view for w in run.members.values()]
    assert {type(m).__name__ for v in members for m in v} == {"Register"}
    single = pay(4, params=SyncParams(private=False))
    assert {v.property for v in single.privacy_violations()} == {"privacy"}
    disputed = pay(3, Adversary(parties={"u1": Stingy()}))
    assert any("member" in v.detail for v in disputed.privacy_violations())  # disputes reveal


def test_onion_constant_size_and_tamper_detection():
    keys = OnionKeys(0, [f"p{i}" for i in range(9)])
    rng = random.Random(0)
    for hops in range(1, 9):
        route = [f"p{i}" for i in range(1, hops + 1)]
        payloads = [HopPayload(route[j + 1] if j + 1 < hops else None, 50 - j, 9.5 - j,
                               bytes([j]) * 32, (b"t" if j + 1 == hops else b"\0") * 16)
                    for j in range(hops)]
        pkt, seen = build_onion(route, payloads, keys, rng), set()
        for j, party in enumerate(route):
            assert len(pkt) == ONION_BYTES and pkt not in seen
            seen.add(pkt)
            with pytest.raises(CryptoError, match="MAC"):
                peel_onion(pkt[:-1] + bytes([pkt[-1] ^ 1]), keys.private(party))
            if hops > 1:
                with pytest.raises(CryptoError):
                    peel_onion(pkt, keys.private(route[(j + 1) % hops]))
            got, pkt = peel_onion(pkt, keys.private(party))
            assert got == payloads[j]
        assert pkt is None


def _probable_prime(n, rounds=16):
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    rng = random.Random(n)
    for _ in range(rounds):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


@pytest.mark.parametrize("group", [SIM_GROUP, RFC3526_2048])
def test_lock_groups_are_safe_prime_subgroups(group):
    assert _probable_prime(group.p) and _probable_prime(group.q)
    assert pow(group.g, group.q, group.p) == 1 and group.g != 1


def test_per_hop_lock_derivation_and_single_hash_baseline():
    rng = random.Random(4)
    for scheme in (PerHopLocks(), PerHopLocks(RFC3526_2048), SingleHashLock()):
        x, h = scheme.new_secret(rng)
        conds, tweaks = scheme.setup(h, 4, rng)
        pre = scheme.receiver_preimage(x, tweaks[-1])
        for i in reversed(range(4)):
            assert scheme.verify(pre, conds[i]) and not scheme.verify(pre + b"\0", conds[i])
            if i:
                assert scheme.downstream_cond(conds[i - 1], tweaks[i - 1]) == conds[i]
                pre = scheme.derive(pre, tweaks[i - 1])
        assert (len(set(conds)) == 4) == scheme.private


# -- bad input ----------------------------------------------------------------------------------
BAD = [
    (lambda g: run_syncpcn(g, [("u0", "u2", 500, ("u0", "u1", "u2"))]), InsufficientBalance,
     "needs 501"),
    (lambda g: run_syncpcn(g, [("u0", "u2", 500)]), NoRoute, "no route"),
    (lambda g: run_syncpcn(g, [("u0", "zed", 5)]), UnknownParty, "unknown party 'zed'"),
    (lambda g: run_syncpcn(g, [("u0", "u2", 0)]), InvalidAmount, "must be positive"),
    (lambda g: run_syncpcn(g, [("u0", "u2", 5)], params=SyncParams(n=3)), ConfigError,
     r"n=3 not allowed for f=1: need n >= 3f\+1"),
    (lambda g: run_syncpcn(g, [("u0", "u2", 5)], params=SyncParams(claim_quorum=2)),
     ConfigError, "quorums"),
    (lambda g: run_syncpcn(g, [("u0", "u2", 5)], params=SyncParams(hop_slack=2.5)),
     ConfigError, r"hop slack δ=2.5 must be >= 3Δ \+ proc = 3.0"),
    (lambda g: run_syncpcn(g, [("u0", "u3", 5, ("u0", "u1", "u3"))]), ChannelClosed,
     "closed channel 'cx'"),
    (lambda g: run_syncpcn(g, [("u0", "u0", 5)]), NoRoute, "same party"),
    (lambda g: run_syncpcn(g, [("u0", "u2", 5)], signer="rsa"), ConfigError, "signer"),
]


@pytest.mark.parametrize("call,error,message", BAD)
def test_bad_input_rejected_without_balance_change(call, error, message):
    g = line(2)
    g.add_channel("u1", "u3", 50, 50, cid="cx").close()
    before = g.snapshot()
    with pytest.raises(error, match=message):
        call(g)
    assert g.snapshot() == before


# -- properties ---------------------------------------------------------------------------------
PARTY_BEHAVIOURS = [None, None, None, Stingy, Griefer, Silent, RefundCheater, BadOnion,
                    ShortDeadlines, NoFee, lambda: LateClaimer(0.05), lambda: LateClaimer(0.5),
                    lambda: LateClaimer(0.95)]
MEMBER_BEHAVIOURS = [lambda: Crashed(), lambda: Crashed(at_time=6.0),
                     lambda: Crashed(at_phase="VERDICT"), lambda: Equivocating(flip_verdict),
                     lambda: Colluding(True, True), lambda: Colluding(False, False),
                     lambda: Colluding(False, True), lambda: Colluding(True, False)]


@st.composite
def scenarios(draw, random_graph):
    f = draw(st.sampled_from([1, 2]))
    rnd = random.Random(draw(st.integers(0, 2**32)))
    n_parties = draw(st.integers(2, 6))
    g = ChannelGraph()
    names = [f"p{i}" for i in range(n_parties)]
    edges = [(rnd.randrange(i), i) if random_graph else (i - 1, i) for i in range(1, n_parties)]
    if random_graph:
        edges += [tuple(sorted(rnd.sample(range(n_parties), 2)))
                  for _ in range(draw(st.integers(0, 2))) if n_parties > 2]
    for i, j in dict.fromkeys(edges):
        g.add_channel(names[i], names[j], rnd.randint(20, 60), rnd.randint(20, 60))
    k = draw(st.integers(1, 3))
    payments = []
    for _ in range(k):
        s, r = rnd.sample(names, 2)
        payments.append((s, r, draw(st.integers(1, 12))))
    parties = {}
    for p in names:
        make = draw(st.sampled_from(PARTY_BEHAVIOURS))
        if make is not None:
            parties[p] = make()
    members = {}
    for cid in g.channels:
        for m in rnd.sample(range(3 * f + 1), draw(st.integers(0, f))):
            members[member_id(cid, m)] = draw(st.sampled_from(MEMBER_BEHAVIOURS))()
    timing = draw(st.sampled_from(["random", "exact", "extreme"]))
    delay = {"random": None, "exact": lambda env: DELTA,
             "extreme": lambda env: DELTA * (env.msg_id % 2)}[timing]
    return g, payments, f, Adversary(parties=parties, members=members, delay=delay)


def check_scenario(scenario, seed):
    g, payments, f, adversary = scenario
    run = run_syncpcn(g, payments, seed=seed, adversary=adversary, committee_f=f, signer="hmac",
                      spacing=draw_spacing(seed))
    assert run.violations() == []
    for pid, hops in run.hops.items():  # every honest lock resolved by T_1 + 3Δ + a Δ round
        for h in hops:
            if h.locked_at is not None and (h.payer in run.payments[pid].honest
                                            or h.payee in run.payments[pid].honest):
                assert h.resolved_at is not None
                assert h.resolved_at <= h.deadline + 5 * DELTA


def draw_spacing(seed):
    return [0.0, 0.5, 7.0][seed % 3]


SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=900, **SETTINGS)
@given(scenarios(random_graph=False), st.integers(0, 10**6))
def test_property_paths_with_byzantine_parties_and_members(scenario, seed):
    check_scenario(scenario, seed)


@settings(max_examples=900, **SETTINGS)
@given(scenarios(random_graph=True), st.integers(0, 10**6))
def test_property_random_graphs_concurrent_payments(scenario, seed):
    check_scenario(scenario, seed)


@settings(max_examples=250, **SETTINGS)
@given(st.integers(1, 4), st.sampled_from([1, 2]), st.integers(0, 10**6))
def test_property_honest_runs_are_optimistic_and_private(hops, f, seed):
    run = pay(hops, seed=seed, committee_f=f)
    assert run.violations() == [] and run.privacy_violations() == []
    assert run.stats.total_messages == optimistic_messages(hops, 3 * f + 1)
    assert run.records[0].outcomes == [SETTLED] * hops
