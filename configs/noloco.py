"""NoLoCo replicas (pairwise gossip, no all-reduce); see configs/replicated.py for variants.

    python -m decjax.launch --processes=4 -- python -m decjax.train \
        --config=configs/noloco.py:size=tiny --workdir=runs/noloco-4p
"""

from configs import replicated


def get_config(arg=None):
    return replicated.get_config(",".join(filter(None, ["method=noloco", arg])))
