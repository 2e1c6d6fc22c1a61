"""The registry of OOD scores in the fused head, in output (and computation) order.

Adding a score is one module with a :class:`~oodguard.export.scores.base.Score` subclass plus one line
here; the fused head, the Triton configs and calibration all follow this registry.
"""

from .base import FitData, Score
from .cluster import Cluster
from .energy import Energy
from .gradnorm import GradNorm
from .knn import Knn
from .maxlogit import MaxLogit
from .msp import Msp
from .sisom import Sisom
from .sisom_ml import SisomMl
from .sisome import Sisome
from .sisome_ml import SisomeMl

SCORES: dict[str, type[Score]] = {
    cls.name: cls for cls in (Sisom, Sisome, SisomMl, SisomeMl, Energy, Msp, MaxLogit, Knn, Cluster, GradNorm)
}

__all__ = ["SCORES", "FitData", "Score"]
