"""The decision policy's defaults, in a module that imports nothing: the settings (read while the CLI builds its
parser, which must not import numpy) and the decision rule (:mod:`oodguard.serve.decision`) share them."""

#: the score whose verdicts name a driver, and where its components are recorded in calibration.json
FUSED = "fused"
#: the default policy's deciding scores and fallback (the gateway's settings default to them too)
DEFAULT_SCORES, DEFAULT_FALLBACK = (FUSED,), ("sisome",)

__all__ = ["FUSED", "DEFAULT_SCORES", "DEFAULT_FALLBACK"]
