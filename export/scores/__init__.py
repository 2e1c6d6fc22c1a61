"""The registry of OOD scores in the fused head, in output (and computation) order.

Adding a score is one module with a :class:`~oodguard.export.scores.base.Score` subclass plus one line
here; the fused head, the Triton configs and calibration all follow this registry.

The multi-layer scores (:data:`MULTI_LAYER`) are opt-in (``oodguard export --multi-layer``): they add a
backward pass through the backbone's tail and a bank of their own to the graph. :func:`registry` is the list
an export fits; what a given version serves is the ``scores`` list of its calibration.json, never this one.
"""

from .base import FitData, Score
from .cluster import Cluster
from .energy import Energy
from .gradnorm import GradNorm
from .knn import Knn, KnnCentred
from .mahalanobis import RelativeMahalanobis
from .maxlogit import MaxLogit
from .msp import Msp
from .sisom import Sisom
from .sisom_ml import SisomMl
from .sisome import Sisome
from .sisome_ml import SisomeMl

SCORES: dict[str, type[Score]] = {
    cls.name: cls for cls in (Sisom, Sisome, SisomMl, SisomeMl, Energy, Msp, MaxLogit, Knn, KnnCentred,
                      RelativeMahalanobis, Cluster, GradNorm)
}

#: the scores only an export with ``multi_layer`` (``oodguard export --multi-layer``) fits
MULTI_LAYER: tuple[str, ...] = (SisomMl.name, SisomeMl.name)


def registry(multi_layer: bool = False) -> dict[str, type[Score]]:
    """The scores an export fits, in registry order: every score with ``multi_layer``, else all but
    :data:`MULTI_LAYER`."""
    return {name: cls for name, cls in SCORES.items() if multi_layer or name not in MULTI_LAYER}


__all__ = ["MULTI_LAYER", "SCORES", "FitData", "Score", "registry"]
