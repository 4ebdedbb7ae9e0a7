"""Settings of the image service (no Ray import: the CLI checks them before starting anything).

Two sets: :class:`ServeConfig` is what one replica needs (the model, its batching, what a request may ask for), and
:class:`~runtime.serve.gate.GateConfig` what the HTTP gate in front of it checks before anything reaches a replica.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from ..inputs import Limits, Request, check_pixels

#: The environment variable an API key may come from (instead of ``--api-key-file``).
API_KEY_ENV = "INSTAFLOW_API_KEY"


@dataclass
class ServeConfig:
    """One replica's settings: which model it serves, how it batches, what one request may ask for.

    The cost of a request is its pixels times its Euler steps, doubled with guidance (``guidance_scale > 1`` runs
    the UNet on two batches): "pixel-steps". ``max_cost`` bounds one request and ``max_batch_cost`` one pipeline
    call; left at ``None``, both are sized at start-up to what this replica computes in ``cost_seconds`` (the
    fastest of three full calls at the menu's first size), but never below one step at the menu's largest size per
    request and ``max_batch`` of those per call. Measured on a shared machine they vary from one start to the next:
    pin them for reproducible limits.
    """

    ckpt: str = "tiny"
    backend: str = "auto"
    device: str | None = None
    dtype: str | None = None
    max_batch: int = 8  # images per pipeline call
    max_wait_ms: float = 5.0  # how long a batch waits for more requests
    max_queue: int = 64  # requests a replica queues besides a running call; as many more may wait in the proxy
    sizes: str | None = None  # "WIDTHxHEIGHT,...": the size menu; None: the checkpoint's size, 3:2 and 2:3
    allow_other_sizes: bool = False  # sizes off the menu, within the limits, run eagerly (never captured)
    max_cost: int | None = None  # pixel-steps per request; None: what this replica computes in cost_seconds
    max_batch_cost: int | None = None  # pixel-steps per pipeline call; None: as max_cost
    cost_seconds: float = 2.0  # the work a request (and a batch) may ask for, in this replica's measured seconds
    max_pixels: int | None = None  # per image, off the menu; None: the pipeline's default limit
    max_steps: int | None = None  # Euler steps per request; None: the pipeline's default limit
    max_prompt_chars: int = 1000  # per prompt and per negative prompt
    max_guidance: float = 20.0  # guidance_scale above this is refused (1e308 overflows to NaN)
    request_timeout_s: float = 60.0  # a request older than this is abandoned (Ray Serve answers 408)
    treat_as_flow: bool = False

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_prompt_chars"):
            _check_int(self, name, 1)
        if self.max_queue < self.max_batch:
            raise InvalidInputError(f"--max-queue must be an integer >= --max-batch ({self.max_batch}), "
                                    f"got {self.max_queue!r}")
        for name in ("max_pixels", "max_steps", "max_cost", "max_batch_cost"):
            if getattr(self, name) is not None:
                _check_int(self, name, 1)
        for name, low in (("max_wait_ms", 0.0), ("cost_seconds", 1e-3), ("request_timeout_s", 0.1),
                          ("max_guidance", 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < low:
                raise InvalidInputError(f"{_flag(name)} must be a number >= {low:g}, got {value!r}")
        if self.sizes is not None:
            parse_sizes(self.sizes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> "ServeConfig":
        """From ``serve.yaml``'s ``args``: unknown names are one line, not a TypeError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise InvalidInputError(f"unknown service setting(s) {', '.join(unknown)}; known: "
                                    f"{', '.join(sorted(known))}")
        return cls(**args)

    @property
    def graceful_shutdown_s(self) -> float:
        """How long a stopping replica may take: the longest an admitted request may live, and a margin."""
        return self.request_timeout_s + 5.0

    def capacity(self, replicas: int = 1) -> int:
        """Requests the service holds at once: each replica's queue and running call, and ``max_queue`` more on
        their way to a replica. The gate refuses beyond it (503 before the body is read), and it is also the room
        in Ray Serve's proxy queue: a burst the replicas have room for waits there while Ray's router hands it out
        one by one (a proxy queue of ``max_queue`` = 8 refused 3 of a burst of 12 on two busy cores, while the
        replica had room for all 12)."""
        return replicas * (self.max_queue + self.max_batch) + self.max_queue


def _flag(name: str) -> str:
    return "--" + name.replace("_s", "").replace("_", "-") if name == "request_timeout_s" else \
        "--" + name.replace("_", "-")


def _check_int(config: Any, name: str, low: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidInputError(f"{_flag(name)} must be an integer >= {low}, got {value!r}")


_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"512x512,768x512"`` (WIDTHxHEIGHT, comma-separated) -> ``[(height, width), ...]`` without repeats."""
    sizes: list[tuple[int, int]] = []
    for part in str(text).split(","):
        m = _SIZE.match(part)
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise InvalidInputError(f"--sizes takes WIDTHxHEIGHT[,WIDTHxHEIGHT...] (e.g. 512x512,768x512), "
                                    f"got {part.strip()!r}")
        hw = (int(m.group(2)), int(m.group(1)))
        if hw not in sizes:
            sizes.append(hw)
    return sizes


def format_size(height: int, width: int) -> str:
    """``(height, width)`` -> ``"WIDTHxHEIGHT"``, the way ``--sizes`` writes it."""
    return f"{width}x{height}"


def default_sizes(default: tuple[int, int], multiple: int) -> list[tuple[int, int]]:
    """The menu when ``--sizes`` is not given: the checkpoint's own size, and 3:2 landscape and 2:3 portrait with
    its shorter side (sides rounded to ``multiple``, what the UNet's downsampling needs)."""
    h, w = default
    side = min(h, w)
    long = max(multiple, int(round(1.5 * side / multiple)) * multiple)
    out = [(h, w)]
    for size in ((side, long), (long, side)):
        if size not in out:
            out.append(size)
    return out


def menu_for(config: ServeConfig, components: Any, limits: Any = None) -> list[tuple[int, int]]:
    """The size menu of ``config`` for a checkpoint's ``components`` (configs are enough: no weights needed), each
    size checked as the pipeline checks it (multiples of the VAE scale factor, within ``limits``): one line for a
    size the model cannot take, before anything is served."""

    if config.sizes is None:
        down = len(getattr(components.unet.config, "down_block_types", ())) or 4
        sizes = default_sizes(components.default_size, components.vae_scale_factor * 2 ** (down - 1))
    else:
        sizes = parse_sizes(config.sizes)
    if limits is None:
        limits = Limits()
        if config.max_pixels is not None:
            limits.max_pixels = config.max_pixels
    for h, w in sizes:
        try:
            check_pixels(h, w, components.vae_scale_factor)
            limits.check(Request(["x"], [""], 1, 0.0, h, w, 1, "pil"))
        except InvalidInputError as e:
            raise InvalidInputError(f"--sizes {format_size(h, w)}: {e}") from None
    return sizes


def hash_key(key: str) -> str:
    """The SHA-256 (hex) of an API key: what the service keeps and compares, never the key itself."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def read_api_key(key: str | None = None, key_file: str | os.PathLike[str] | None = None,
                 environ: dict[str, str] | None = None) -> str | None:
    """The API key from ``--api-key``, ``--api-key-file`` (first line) or ``$INSTAFLOW_API_KEY``, in that order; None
    when none is given. Keys shorter than 16 characters are refused (one line)."""
    environ = os.environ if environ is None else environ
    if key is None and key_file is not None:
        try:
            lines = Path(key_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidInputError(f"cannot read the API key file {key_file}: {e.__class__.__name__}") from None
        key = lines[0].strip() if lines else ""
    if key is None:
        key = environ.get(API_KEY_ENV) or None
    if key is None:
        return None
    if len(key) < 16 or any(c.isspace() or not c.isprintable() for c in key):
        raise InvalidInputError("an API key must be at least 16 printable characters without spaces "
                                "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return key
