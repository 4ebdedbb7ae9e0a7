"""Deprecated name of :mod:`runtime.builders` (the model builders serve benchmarks and training too, not only
tests); kept so that existing imports work. Import from ``runtime.builders``."""

import warnings

from .builders import *  # noqa: F401,F403

warnings.warn("runtime.testing is now runtime.builders", DeprecationWarning, stacklevel=2)
