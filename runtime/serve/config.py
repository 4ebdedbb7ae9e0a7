"""Settings of the image service (no Ray import: the CLI checks them before starting anything)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import InvalidInputError


@dataclass
class ServeConfig:
    """One replica's settings: which model it serves, how it batches, how much it admits."""

    ckpt: str = "tiny"
    backend: str = "torch"
    device: str | None = None
    dtype: str | None = None
    max_batch: int = 8  # images per pipeline call (Ray Serve's max_batch_size)
    max_wait_ms: float = 5.0  # how long a batch waits for more requests
    max_queue: int = 64  # requests a replica holds (queued + running); more get 503 with Retry-After
    max_pixels: int | None = None  # per image; None: the pipeline's default limit
    max_steps: int | None = None  # Euler steps per request; None: the pipeline's default limit
    treat_as_flow: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise InvalidInputError(f"--max-batch must be an integer >= 1, got {self.max_batch!r}")
        if not isinstance(self.max_queue, int) or self.max_queue < self.max_batch:
            raise InvalidInputError(f"--max-queue must be an integer >= --max-batch ({self.max_batch}), "
                                    f"got {self.max_queue!r}")
        if not self.max_wait_ms >= 0:
            raise InvalidInputError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms!r}")
        for name in ("max_pixels", "max_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InvalidInputError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
