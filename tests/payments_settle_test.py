"""Settling a training run: work log -> one multi-hop payment per compute node."""

import json

import pytest

from decjax.payments.errors import ConfigError, InvalidAmount
from decjax.payments.settle import (
    SettlementError,
    WorkLogError,
    main,
    read_work,
    settle,
    settle_run,
    settlement_graph,
)

WORK_STEPS = [
    {"io": 4, "stage0": 4, "stage1": 3},
    {"io": 4, "stage0": 2, "stage1": 4},
    {"io": 4, "stage0": 0, "stage1": 4},
]
TOTALS = {"io": 12, "stage0": 6, "stage1": 11}


def write_events(path, work_steps=WORK_STEPS, extra=()):
    """An events.jsonl in the trainer's format: start, one work event per step, checkpoint, end."""
    lines = [{"step": 0, "event": "start", "time": 1.0, "n_params": 10}]
    for step, work in enumerate(work_steps, 1):
        lines.append({"step": step, "event": "work", "time": 1.0 + step, "microbatches": work})
    lines += [{"step": len(work_steps), "event": "checkpoint", "time": 9.0, "path": "x"},
              *extra, {"step": len(work_steps), "event": "end", "time": 10.0, "val_loss": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


@pytest.fixture
def run_dir(tmp_path):
    write_events(tmp_path / "events.jsonl")
    return tmp_path


# -- read_work-------------------------------------------------------------------------------------
def test_read_work_sums_microbatches_per_node(run_dir):
    before = (run_dir / "events.jsonl").read_bytes()
    assert read_work(run_dir / "events.jsonl") == TOTALS
    assert list(read_work(run_dir / "events.jsonl")) == ["io", "stage0", "stage1"]
    assert (run_dir / "events.jsonl").read_bytes() == before


def test_read_work_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no events file"):
        read_work(tmp_path / "missing.jsonl")
    no_work = tmp_path / "old.jsonl"
    no_work.write_text(json.dumps({"step": 0, "event": "start", "time": 1.0}) + "\n")
    with pytest.raises(WorkLogError, match="no 'work' events"):
        read_work(no_work)
    bad = write_events(tmp_path / "bad.jsonl")
    lines = bad.read_text().splitlines()
    lines.insert(2, '{"step": 2, "event": "work", "microbatch')
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(WorkLogError, match=r"bad\.jsonl:3: not valid JSON"):
        read_work(bad)
    negative = write_events(tmp_path / "neg.jsonl", [{"io": 4, "stage0": -1}])
    with pytest.raises(WorkLogError, match=r"neg\.jsonl:2: microbatches of 'stage0'"):
        read_work(negative)
    twice = write_events(tmp_path / "twice.jsonl", WORK_STEPS, extra=[
        {"step": 2, "event": "work", "time": 3.0, "microbatches": {"io": 4}}])
    with pytest.raises(WorkLogError, match="step 2 already has a work event .line 3.; refusing"):
        read_work(twice)


# -- the graph-------------------------------------------------------------------------------------
def test_settlement_graph_has_no_payer_node_channel_and_is_deterministic():
    nodes = ["io", "stage0", "stage1", "stage2"]
    g = settlement_graph(nodes, n_relays=5, seed=3)
    for node in nodes:
        neighbours = {nb for nb, _ in g.adjacency[node]}
        assert len(neighbours) == 1 and neighbours <= {f"relay{i}" for i in range(5)}
    assert {nb for nb, _ in g.adjacency["coordinator"]} == {"relay0"}
    assert g.snapshot() == settlement_graph(nodes, n_relays=5, seed=3).snapshot()
    with pytest.raises(ConfigError, match="distinct"):
        settlement_graph(["relay0"], n_relays=2)


# -- settle----------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["psyncpcn", "syncpcn"])
def test_every_node_paid_exactly_and_relays_earn_their_fees(protocol):
    g = settlement_graph(list(TOTALS), n_relays=4, seed=1, capacity=10_000)
    start = g.holdings()
    s = settle(TOTALS, price_per_microbatch=7, protocol=protocol, seed=1, graph=g, fee=2)
    end = g.holdings()
    assert s.violations == [] and s.failed == [] and s.ok
    for p in s.payments:
        assert p.status == "paid" and p.amount == TOTALS[p.node] * 7 == p.received
        assert end[p.node] - start[p.node] == p.amount
        assert p.hops >= 2 and p.hops == len(p.path) - 1
        assert p.path[0] == "coordinator" and p.path[-1] == p.node
        assert all(u.startswith("relay") for u in p.path[1:-1])
        assert p.relay_fees == {u: 2 for u in p.path[1:-1]} and p.fees == 2 * (p.hops - 1)
        assert p.messages > 0 and p.bytes > 0 and p.latency > 0
    expected_fees = {}
    for p in s.payments:
        for u in p.path[1:-1]:
            expected_fees[u] = expected_fees.get(u, 0) + 2
    assert s.relay_earnings == expected_fees
    for relay, fee in expected_fees.items():
        assert end[relay] - start[relay] == fee
    assert s.total_paid == sum(TOTALS.values()) * 7
    assert start["coordinator"] - end["coordinator"] == s.payer_cost == s.total_paid + s.total_fees
    assert sum(end.values()) == sum(start.values())  # conservation
    assert all(not ch.locks for ch in g.channels.values())
    assert s.messages == sum(p.messages for p in s.payments)


def test_latency_and_messages_follow_the_protocol_formulas():
    from decjax.payments.psyncpcn import message_formula
    from decjax.payments.syncpcn import optimistic_messages

    for protocol in ("psyncpcn", "syncpcn"):
        s = settle(TOTALS, price_per_microbatch=1, protocol=protocol, seed=4, n_relays=5)
        for p in s.payments:
            if protocol == "psyncpcn":
                assert p.messages == sum(message_formula(p.hops, 4).values())
                assert p.latency == 2 * p.hops + 1
            else:
                assert p.messages == optimistic_messages(p.hops, 4)
                assert p.latency == 4 * p.hops + 1


def test_same_seed_same_settlement():
    a = settle(TOTALS, price_per_microbatch=3, seed=5, n_relays=6)
    b = settle(TOTALS, price_per_microbatch=3, seed=5, n_relays=6)
    assert a.to_dict() == b.to_dict() and a.summary() == b.summary()
    c = settle(TOTALS, price_per_microbatch=3, seed=5, n_relays=6, delay="random")
    assert c.ok and c.total_paid == a.total_paid


def test_insufficient_capacity_is_reported_not_dropped():
    # io's 60 (+ fees) fits; it leaves the payer's only channel too poor for stage0's 30.
    g = settlement_graph(list(TOTALS), n_relays=3, seed=0, capacity=65)
    s = settle(TOTALS, price_per_microbatch=5, seed=0, graph=g, strict=True)
    status = {p.node: p.status for p in s.payments}
    assert status == {"io": "paid", "stage0": "failed", "stage1": "failed"}
    assert all("no route" in p.reason for p in s.failed)
    assert [p.received for p in s.payments] == [60, 0, 0]
    assert s.violations == [] and not s.ok
    assert s.total_paid == 60 and s.payer_cost == 60 + s.total_fees
    assert "failed payments: stage0, stage1" in s.summary()


def test_zero_work_is_not_paid():
    s = settle({"io": 2, "stage0": 0}, price_per_microbatch=1, seed=0)
    assert [(p.node, p.status, p.received) for p in s.payments] == [
        ("io", "paid", 2), ("stage0", "nothing_to_pay", 0)]


def test_bad_input_errors():
    with pytest.raises(InvalidAmount, match="price_per_microbatch must be positive"):
        settle(TOTALS, price_per_microbatch=-1)
    with pytest.raises(InvalidAmount, match="must be an int"):
        settle(TOTALS, price_per_microbatch=1.5)
    with pytest.raises(ConfigError, match="unknown protocol 'lightning'"):
        settle(TOTALS, price_per_microbatch=1, protocol="lightning")
    with pytest.raises(ConfigError, match="cannot also be paid"):
        settle({"coordinator": 1}, price_per_microbatch=1)
    with pytest.raises(ConfigError, match="nothing to settle"):
        settle({}, price_per_microbatch=1)
    assert issubclass(SettlementError, ValueError)


# -- settle_run and the CLI------------------------------------------------------------------------
def test_settle_run_writes_json_and_never_overwrites(run_dir):
    events = (run_dir / "events.jsonl").read_bytes()
    s = settle_run(run_dir, price_per_microbatch=2, protocol="syncpcn", seed=0)
    record = json.loads((run_dir / "settlement.json").read_text())
    assert record["work"] == TOTALS and record["protocol"] == "syncpcn"
    assert record["total_paid"] == s.total_paid == 2 * sum(TOTALS.values())
    assert {p["node"]: p["received"] for p in record["payments"]} == {
        k: 2 * v for k, v in TOTALS.items()}
    stored = (run_dir / "settlement.json").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        settle_run(run_dir, price_per_microbatch=3)
    assert (run_dir / "settlement.json").read_bytes() == stored
    settle_run(run_dir, price_per_microbatch=3, overwrite=True)
    assert json.loads((run_dir / "settlement.json").read_text())["price_per_microbatch"] == 3
    assert (run_dir / "events.jsonl").read_bytes() == events
    assert sorted(p.name for p in run_dir.iterdir()) == ["events.jsonl", "settlement.json"]


def test_settle_run_missing_events_writes_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        settle_run(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cli(run_dir, capsys):
    assert main([f"--workdir={run_dir}", "--protocol=psyncpcn", "--price=2"]) == 0
    out = capsys.readouterr().out
    assert "stage1" in out and "paid 58 to 3 nodes" in out and "settlement.json" in out
    assert main([f"--workdir={run_dir}"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([f"--workdir={run_dir / 'nope'}"]) == 2


@pytest.mark.parametrize("field, value, message", [
    ("protocol", "lightning", "settle: unknown protocol 'lightning'"),
    ("price_per_microbatch", 0, "settle: price_per_microbatch must be positive"),
    ("n_relays", 0, "settle: n_relays must be an int >= 1"),
])
def test_a_bad_settle_field_fails_before_training(field, value, message):
    from configs import payments
    from decjax.train import validate
    from decjax.train.config import ConfigError

    config = payments.get_config("size=tiny")
    config.settle[field] = value
    with pytest.raises(ConfigError, match=message):
        validate(config)
    config = payments.get_config("size=tiny")
    config.trainer = "replicated"
    with pytest.raises(ConfigError, match="only trainer='loop'"):
        validate(config)
