"""instaflow-rt runtime: one-step text-to-image generation with rectified flows (InstaFlow).

>>> from runtime import Pipeline
>>> pipe = Pipeline.from_pretrained("tiny")                         # doctest: +SKIP
>>> images = pipe(["a red circle at the top left"], seed=0).images  # doctest: +SKIP

This package is the leaf of the project: ``export`` and ``train`` import from it, never the reverse.
"""

from .checkpoints import ALIASES, FLOW_PIPELINE_CLASS, Checkpoint, resolve
from .errors import (
    BackendUnavailableError,
    CheckpointError,
    ExportError,
    InstaFlowError,
    InvalidInputError,
    InvalidTypeError,
    NonFiniteOutputError,
)
from .models import Components, load_components
from .pipeline import Pipeline, PipelineOutput

__version__ = "0.1.0"

__all__ = [
    "ALIASES", "FLOW_PIPELINE_CLASS", "BackendUnavailableError", "Checkpoint", "CheckpointError", "Components",
    "ExportError",    "InstaFlowError", "InvalidInputError", "InvalidTypeError", "NonFiniteOutputError", "Pipeline",
    "PipelineOutput", "load_components", "resolve",
]
