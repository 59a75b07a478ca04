"""The two players' networks and their distributions; `build_players` builds both from a model config.

Layers (`layers.py`), player interfaces (`players.py`), distributions, one file per family under
`families/`, and the registry by `model.kind`. Must not import `runtime`, deepspeed, webdataset or any I/O.
"""

from symeq_dist.models.distributions import Bernoulli, Categorical, Distribution, Gaussian
from symeq_dist.models.players import Decoder, Encoder, JointModule, Players
from symeq_dist.models.registry import FAMILIES, build_players

__all__ = [
    "FAMILIES", "Bernoulli", "Categorical", "Decoder", "Distribution", "Encoder", "Gaussian", "JointModule",
    "Players", "build_players",
]
