"""Methods wire a backbone, projector, predictor and momentum target (each where the method has
one); the engine trains them.

An explicit table (no registry): ``METHODS[name](cfg) -> SiameseMethod``.
"""

from __future__ import annotations

from collections.abc import Callable

from sslctl.config import Config
from sslctl.methods.byol import BYOL
from sslctl.methods.common import SiameseMethod
from sslctl.methods.mocov2 import MoCoV2
from sslctl.methods.simclr import SimCLR
from sslctl.methods.simsiam import SimSiam
from sslctl.methods.triplet import Triplet

METHODS: dict[str, Callable[[Config], SiameseMethod]] = {
    "triplet": Triplet,
    "byol": BYOL,
    "simclr": SimCLR,
    "mocov2": MoCoV2,
    "simsiam": SimSiam,
}


def build_method(cfg: Config) -> SiameseMethod:
    return METHODS[cfg.method.name](cfg)


__all__ = ["METHODS", "SiameseMethod", "build_method"]
