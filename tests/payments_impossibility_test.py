"""Impossibility of async multi-hop payments with faulty channels (spec §2.3), by simulation."""

import runpy

import pytest

from decjax.payments.impossibility import demonstrate, run_naive, run_psync


@pytest.fixture(scope="module")
def report():
    return demonstrate()


def test_c1_cannot_distinguish_e1_from_e2(report):
    e1, e2 = report.views["naive-timeout/E1"], report.views["naive-timeout/E2"]
    assert report.views_identical and e1 == e2
    assert [(kind, what) for _, kind, what, _ in e1] == [
        ("recv", "START"), ("send", "LOCK_REQ"), ("timer", "DEADLINE"), ("send", "ABORT")]
    # After t the executions differ: only in E2 does c2's (late) COMMIT arrive.
    _, full_e1 = run_naive("E1")
    _, full_e2 = run_naive("E2")
    assert full_e1 == list(e1) and full_e2[:4] == list(e2)
    assert full_e2[4:] == [(15.0, "recv", "COMMIT", "C2")]


def test_naive_timeout_is_safe_in_e1_but_robs_the_intermediary_in_e2(report):
    e1, e2 = report.row("E1", "naive-timeout"), report.row("E2", "naive-timeout")
    assert e1.outcomes == ("refunded", "absent") and e1.violations == ()
    assert e2.outcomes == ("refunded", "settled")
    assert e2.violations == ("atomicity", "balance_security")
    assert "payment p: honest I (u_1) lost 10" in e2.details
    assert "payment p: hops [2] settled, outcomes ['refunded', 'settled']" in e2.details


def test_escape_1_waiting_never_terminates_in_e1(report):
    e1, e2 = report.row("E1", "naive-wait"), report.row("E2", "naive-wait")
    assert e1.outcomes == ("locked", "absent") and e1.violations == ("termination",)
    assert "payment p: hop 1 on c1 still locked" in e1.details
    assert e2.outcomes == ("settled", "settled") and e2.violations == ()


def test_psyncpcn_waits_safely_and_needs_correct_channels(report):
    assert report.psync_views_identical
    assert report.row("E2", "PSyncPCN").outcomes == ("settled", "settled")
    assert report.row("E2", "PSyncPCN").violations == ()
    assert report.row("E1", "PSyncPCN").violations == ("termination",)
    bad = report.row("f+1", "PSyncPCN")
    assert bad.violations == ("atomicity", "balance_security", "qc_uniqueness", "termination")
    assert any(d.endswith("channel c2: valid COMMIT-QC and ABORT-QC") for d in bad.details)


@pytest.mark.parametrize("t", [3.0, 7.5, 40.0])
def test_any_deadline_is_fooled(t):
    (r1, v1), (r2, v2) = run_naive("E1", t=t), run_naive("E2", t=t)
    assert [x for x in v1 if x[0] <= t] == [x for x in v2 if x[0] <= t]
    assert r1.violations == () and "balance_security" in r2.violations
    row, _ = run_psync("E2", t=t)
    assert row.violations == ()


@pytest.mark.filterwarnings("ignore:'decjax.payments.impossibility' found in sys.modules")
def test_report_prints_a_table(report, capsys):
    text = str(report)
    assert text.splitlines()[0].split() == ["execution", "protocol", "channel", "c2",
                                           "outcomes", "(c1,", "c2)", "violations"]
    assert "identical up to t=10: True (naive); True (PSyncPCN W_1)" in text
    runpy.run_module("decjax.payments.impossibility", run_name="__main__")
    assert capsys.readouterr().out.strip() == text
