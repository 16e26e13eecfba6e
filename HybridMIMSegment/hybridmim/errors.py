"""Exceptions the engine raises: one class per kind of problem, each with a message meant for the user."""


class HybridMIMError(Exception):
    """Base class: every error the engine reports on purpose derives from it."""


class InputImageError(HybridMIMError):
    """The input volume cannot be used (unreadable, wrong dimension, NaN, ...)."""


class ModelNotFoundError(HybridMIMError):
    """No model folder with the requested id or path."""


class ModelCardError(HybridMIMError):
    """A model card is missing fields or has invalid values."""


class ChecksumError(HybridMIMError):
    """A weights file does not match the sha256 recorded in its card."""


class OutputError(HybridMIMError):
    """The result cannot be written where asked."""


class Cancelled(HybridMIMError):
    """The caller cancelled the operation; nothing was written."""
