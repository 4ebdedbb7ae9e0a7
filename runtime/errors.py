"""Exceptions raised for user mistakes and unusable inputs.

Every error a user can cause is one of these, with a one-line message that names the problem. Command-line tools
print that line and exit non-zero; library users can catch :class:`InstaFlowError` (or ``ValueError`` for the
input errors).
"""

from __future__ import annotations


class InstaFlowError(Exception):
    """Base class of every error instaflow-rt raises on purpose."""


class CheckpointError(InstaFlowError):
    """A checkpoint cannot be found, is not a diffusers folder, lacks a component or has corrupted weights."""


class InvalidInputError(InstaFlowError, ValueError):
    """An argument has a wrong value (bad prompt, size, step count, latents shape, ...)."""


class InvalidTypeError(InstaFlowError, TypeError):
    """An argument has a wrong type (a non-string prompt, ...)."""


class NonFiniteOutputError(InstaFlowError):
    """The model produced NaN or infinite values (typically fp16 overflow)."""


class BackendUnavailableError(InstaFlowError):
    """The requested backend is unknown, or what it needs is not installed."""


class ExportError(InstaFlowError):
    """An export (ONNX graphs, TensorRT engines) cannot be made, reused, verified or used (one-line message)."""


class Cancelled(InstaFlowError):
    """A call was stopped by its ``cancel`` hook (its caller had gone away) before it finished: no images."""
