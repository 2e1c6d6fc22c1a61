"""SISOMe on multi-layer SISOM: :class:`~oodguard.export.scores.sisome.Sisome`'s self-balancing with energy,
its ratio term taken from ``sisom_ml`` (statistics from that score's leave-one-out bank ratios)."""

from .sisome import Sisome


class SisomeMl(Sisome):
    name = "sisome_ml"
    ratio_score = "sisom_ml"
