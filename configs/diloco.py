"""DiLoCo replicas (the NoLoCo paper's baseline); see configs/replicated.py for variants.

    python -m decjax.launch --processes=2 -- python -m decjax.train \
        --config=configs/diloco.py:size=tiny,replicas=2 --workdir=runs/diloco-2p
"""

from configs import replicated


def get_config(arg=None):
    return replicated.get_config(",".join(filter(None, ["method=diloco", arg])))
