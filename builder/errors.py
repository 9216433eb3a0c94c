"""Errors the builder reports to people; each message names what to fix."""


class BuildError(Exception):
    """Base class: the CLI prints the message and exits non-zero."""


class CheckpointError(BuildError):
    """The checkpoint file cannot be read or does not match a supported architecture."""


class ResolutionError(BuildError):
    """The requested export resolution is impossible for this model."""


class GateError(BuildError):
    """No candidate engine stayed within the accuracy budget."""


class VerificationError(BuildError):
    """The exported model disagrees with the JAX reference beyond tolerance."""
