"""What harvest needs to know about the model versions records came from, read from the model repository."""

from __future__ import annotations

from pathlib import Path

from oodguard.calibration import Calibration
from oodguard.repository import CALIBRATION_FILE, version_dir


class CalibrationCache:
    """calibration.json per (model, version), read once from the model repository."""

    def __init__(self, repository: Path):
        self.repository = Path(repository)
        self._cache: dict[tuple[str, int], Calibration] = {}

    def get(self, model: str, version: int) -> Calibration:
        key = (model, int(version))
        if key not in self._cache:
            self._cache[key] = Calibration.load(version_dir(self.repository, model, version) / CALIBRATION_FILE)
        return self._cache[key]
