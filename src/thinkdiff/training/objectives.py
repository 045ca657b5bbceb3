"""The objectives a run can name (``TrainConfig.objective``): adding one is a class that follows
:class:`~thinkdiff.training.objective.Objective` and one line here."""

from __future__ import annotations

from thinkdiff.training.calibration import CalibrationObjective
from thinkdiff.training.objective import Objective
from thinkdiff.training.proxy_objective import ProxyObjective

OBJECTIVES: dict[str, type[Objective]] = {
    "proxy": ProxyObjective,
    "calibrate": CalibrationObjective,
}
"""``TrainConfig.objective`` -> the class that builds it."""
