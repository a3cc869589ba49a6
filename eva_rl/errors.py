"""The project's errors: one base class, so a front end can tell a user's mistake from a bug.

Each class also derives from the builtin a caller would expect (``ValueError`` for a bad value), so code written
against those keeps working. The command line turns every :class:`EvaRLError` into one ``error:`` line and exit code 2.
"""

from __future__ import annotations


class EvaRLError(Exception):
    """Base of every error eva-rl raises on purpose: bad settings, files, environments or agents."""


class ConfigError(EvaRLError, ValueError):
    """A setting with a bad value (a config dataclass, a task or suite file, a command-line option)."""


class EnvError(EvaRLError, ValueError):
    """An environment, package or wrapper that cannot be found or built."""


class AgentError(EvaRLError, ValueError):
    """A pretrained agent that is missing, cannot be loaded, or cannot be adapted."""


class SpaceMismatchError(EvaRLError, ValueError):
    """The target environment's spaces differ from the pretrained agent's."""


class CheckpointError(EvaRLError, ValueError):
    """An adapter checkpoint that is not one, or does not fit the agent it is loaded onto."""


class EvaConvergenceError(EvaRLError, RuntimeError):
    """EVA stopped (batch cap or end of data) before every layer's components converged."""
