"""The model's privacy card: whether its training was differentially private, and with which (ε, δ).

A model's class vector is its honest output, and an over-fitted model's outputs tell whether an image
was in its training set (membership inference, ``docs/threat-model.md``). An owner who trained with
DP-SGD (:mod:`he_cnn.training.dp`) declares the guarantee its privacy accountant computed; the
declaration travels in the model's public spec (the ``privacy`` field of
:meth:`~he_cnn.graph.integer_model.IntegerModel.to_spec`), so S1's ``GET /v1/models/<id>`` shows it to
a user before the first query. It is the owner's claim, not something the clouds can check: they never
see the weights or the data. A spec without the field (stored before it existed) declares no DP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from he_cnn.errors import BadRequest
from he_cnn.graph.parse import shown

#: the mechanism every DP claim here stands for: per-example clipping plus Gaussian noise, accounted by Opacus
MECHANISM = "DP-SGD"
#: far above any ε that still means something (ε = 100 allows a likelihood ratio of e^100), far below a
#: float's range; a larger one is a mistake, not a claim
MAX_EPSILON = 1e4
_FIELDS = ("dp", "epsilon", "delta", "mechanism")


@dataclass(frozen=True)
class TrainingPrivacy:
    """No DP (``epsilon`` None), or an (ε, δ)-DP guarantee for every training image of the model."""

    epsilon: float | None = None
    delta: float | None = None

    def __post_init__(self) -> None:
        if self.epsilon is None:
            if self.delta is not None:
                raise BadRequest("privacy: a delta without an epsilon")
            return
        for name, value in (("epsilon", self.epsilon), ("delta", self.delta)):
            if type(value) not in (int, float) or not math.isfinite(value):  # bool is not a number here
                raise BadRequest(f"privacy: {name} must be a finite number, got {shown(value)}")
        if not 0 < self.epsilon <= MAX_EPSILON:
            raise BadRequest(f"privacy: epsilon must lie in (0, {MAX_EPSILON:g}], got {self.epsilon}")
        if not 0 <= self.delta < 1:  # type: ignore[operator]
            raise BadRequest(f"privacy: delta must lie in [0, 1), got {self.delta}")

    @property
    def dp(self) -> bool:
        return self.epsilon is not None

    def to_json(self) -> dict[str, Any]:
        if not self.dp:
            return {"dp": False}
        return {"dp": True, "mechanism": MECHANISM, "epsilon": self.epsilon, "delta": self.delta}

    def describe(self) -> str:
        """One line for people: ``DP-SGD (ε = 2.98, δ = 1e-05)`` or ``not differentially private``."""
        if not self.dp:
            return "not differentially private"
        return f"{MECHANISM} (ε = {self.epsilon:.4g}, δ = {self.delta:.3g})"

    @classmethod
    def declared(cls, value: Any) -> "TrainingPrivacy":
        """The card a spec or a model file declares (``value``, :meth:`to_json`'s form; None: the field is
        absent, so no DP is declared); :class:`BadRequest` for unknown fields or values out of range."""
        if value is None:
            return cls()
        if not isinstance(value, dict):
            raise BadRequest(f"privacy must be a JSON object, got {shown(value)}")
        unknown = [key for key in value if key not in _FIELDS]
        if unknown:
            raise BadRequest(f"privacy has unknown field(s) {shown(unknown)}; expected {', '.join(_FIELDS)}")
        dp = value.get("dp")
        if type(dp) is not bool:
            raise BadRequest(f"privacy: dp must be true or false, got {shown(dp)}")
        if not dp:
            if set(value) != {"dp"}:
                raise BadRequest("privacy: a model without DP declares no epsilon, delta or mechanism")
            return cls()
        if value.get("mechanism", MECHANISM) != MECHANISM:
            raise BadRequest(f"privacy: mechanism must be {MECHANISM!r}, got {shown(value.get('mechanism'))}")
        if "epsilon" not in value or "delta" not in value:
            raise BadRequest("privacy: a DP model declares both epsilon and delta")
        return cls(value["epsilon"], value["delta"])
