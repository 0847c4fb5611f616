"""Every exception the package defines, in one place.

Bad arguments raise :class:`ConfigurationError`, which is both a ``ValueError`` (what plain Python
callers catch) and Lightning's ``MisconfigurationException`` (what Lightning and ``LightningCLI``
report as a configuration problem), so a facade configured from a YAML file and one built in a
notebook fail the same way. Everything else is a failure of the computation or of the data on
disk, each with its own type below.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.utilities.exceptions import MisconfigurationException

__all__ = [
    "ArchitectureMismatchError",
    "ConfigurationError",
    "EngineUnsupportedError",
    "FragilityError",
    "RetrainingDivergedError",
    "SingularHessianError",
    "SolverNotConvergedError",
    "StoreError",
]


class ConfigurationError(MisconfigurationException, ValueError):
    """An argument has the wrong type or value; the message names the argument and what was expected."""


class StoreError(RuntimeError):
    """A gradient store that is missing, corrupt, or does not match what is asked of it."""


class EngineUnsupportedError(RuntimeError):
    """A per-sample gradient engine cannot differentiate this model although its loss runs (another engine can).

    The message is ``reason`` then ``advice`` (the engine to use instead); the engine's own error is
    the ``__cause__``.

    Attributes:
        reason: what the engine cannot do, without the advice.
    """

    def __init__(self, reason: str, advice: str) -> None:
        super().__init__(f"{reason}. {advice}")
        self.reason = reason
        self.advice = advice

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled with both parts (a process pool or a spawned rank re-raising it), not the joined message.
        return type(self), (self.reason, self.advice)


class SingularHessianError(ValueError):
    """``H + lambda I`` is singular (or numerically so): the inverse-HVP does not exist."""


class SolverNotConvergedError(RuntimeError):
    """An iterative solver stopped before reaching its tolerance (raised with ``on_failure="raise"``)."""


class FragilityError(RuntimeError):
    """A fragility check could not finish.

    Attributes:
        report: the partial :class:`~lightning_influence.fragility.report.FragilityReport` with
            every result measured before the failure (set by ``FragilityCheck.run``).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.report: Any = None


class ArchitectureMismatchError(FragilityError):
    """``make_model`` built a model whose parameters differ (names or shapes) from the reference."""


class RetrainingDivergedError(FragilityError):
    """A retrain ended with inf/NaN weights or test loss, or the fit itself raised."""
