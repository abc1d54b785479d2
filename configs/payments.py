"""Train a small pipeline, then pay its nodes for their microbatches over a payment network.

    python -m decjax.train --config=configs/payments.py --workdir=runs/payments
    python -m decjax.train --config=configs/payments.py:protocol=syncpcn,size=tiny \
        --workdir=runs/payments-tiny

After training, the run's work log (``events.jsonl``: the microbatches each stage's node
processed) is settled with :func:`decjax.payments.settle.settle`: one multi-hop payment per
node from the job's coordinator, through relays, by PSyncPCN or SyncPCN; the result, with each
payment's messages, bytes and latency (in message delays), goes to ``settlement.json``.
Variants: ``protocol`` (psyncpcn, syncpcn), ``f`` (committee fault bound, committees of 3f+1),
``size`` (``quickstart``: the quickstart model, minutes; ``tiny``: seconds). Fields:
``settle.*`` (:func:`decjax.payments.settle.check_options`).
"""

import ml_collections

from configs import base, quickstart


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = base.parse_arg(arg, protocol="psyncpcn", f=1, size="quickstart")
    config = quickstart.get_config(f"size={arg.size}")
    config.settle = ml_collections.ConfigDict(dict(
        protocol=arg.protocol, price_per_microbatch=10, fee=1, n_relays=6, f=arg.f, seed=0,
        signer="hmac", delay="fixed"))
    return config
