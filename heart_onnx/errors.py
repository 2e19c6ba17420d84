"""Errors a user can fix. The CLI prints their message on one line and exits 1, never a traceback."""


class HeartError(Exception):
    """A problem with the user's input (file, plan, budget, option). The message says how to fix it."""


class MissingDependency(HeartError, ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""


class PlanMismatch(HeartError):
    """A plan was made for a different model (its fingerprint does not match)."""


class UnsupportedGraph(HeartError):
    """An ONNX graph does not contain the pattern a pass expects."""
