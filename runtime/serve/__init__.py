"""An HTTP image service on Ray Serve: one :class:`runtime.Pipeline` per replica, Ray Serve's dynamic batching.

    python -m runtime.serve --ckpt tiny --port 8000          # one replica on this machine
    serve run runtime/serve/serve.yaml                        # the same deployment on a Ray cluster

See :mod:`runtime.serve.app` for the API. Needs the ``serve`` extra (``pip install 'instaflow-rt[serve]'``).
"""

from __future__ import annotations

from .config import ServeConfig

__all__ = ["ServeConfig"]
