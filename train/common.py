"""Shared helpers: distributed set-up (torch.distributed via torchrun), prompt files, atomic writes, progress."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from runtime.errors import InstaFlowError


class TrainError(InstaFlowError):
    """A training stage cannot run with the given inputs (one-line message)."""


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed() -> Dist:
    """Join the process group torchrun set up through the environment; single
    process otherwise. gloo on the CPU, NCCL on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Dist(dist.get_rank(), dist.get_world_size(), local)


def device_for(d: Dist) -> torch.device:
    return torch.device(f"cuda:{d.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def load_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Prompts from a text file (one per line), a JSON list (of strings, or of objects with a ``caption``/``text``/
    ``prompt`` field) or a CSV with such a column. Blank lines are dropped."""
    p = Path(path)
    if not p.is_file():
        raise TrainError(f"prompt file does not exist: {p}")
    text = p.read_text(encoding="utf-8")
    keys = ("caption", "text", "prompt")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
            items = data if isinstance(data, list) else data.get("prompts", data.get("captions", []))
            prompts = [x if isinstance(x, str) else next((x[k] for k in keys if k in x), None) for x in items]
        elif p.suffix.lower() == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
            col = next((k for k in keys if rows and k in rows[0]), None)
            if col is None:
                raise TrainError(f"{p}: CSV needs a column named one of {', '.join(keys)}")
            prompts = [r[col] for r in rows]
        else:
            prompts = text.splitlines()
    except (json.JSONDecodeError, AttributeError, TypeError) as e:
        raise TrainError(f"unreadable prompt file {p}: {e}") from None
    prompts = [x.strip() for x in prompts if isinstance(x, str) and x.strip()]
    if not prompts:
        raise TrainError(f"prompt file {p} holds no prompts")
    return prompts


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def batches(indices: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(indices), size):
        yield indices[i:i + size]


def progress(total: int, desc: str, enabled: bool, unit: str = "it") -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, where a negative number in scientific notation is a value, not an option: argparse
    reads ``--lr -1e-3`` as two options ("expected one argument"), so it becomes ``--lr=-1e-3`` and the range check
    can say what is wrong. With ``--recipe FILE:TABLE`` (when the parser has that flag) the table's settings become
    the defaults; flags given on the command line override them."""
    args = list(sys.argv[1:] if argv is None else argv)
    out: list[str] = []
    for a in args:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE_NUMBER.match(a):
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    if any(a.dest == "recipe" for a in parser._actions):
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--recipe", default=None)
        known, _ = pre.parse_known_args(out)
        if known.recipe:
            parser.set_defaults(**recipe_defaults(parser, known.recipe))
    return parser.parse_args(out)


def load_recipe(spec: str) -> tuple[Path, str, dict[str, Any]]:
    """``FILE:TABLE`` -> (file, table, the table's settings). A recipe is a TOML file of tables of flag settings, one
    table per stage (``train/recipes/instaflow_sd15.toml``)."""
    import tomllib

    path_text, sep, table = spec.rpartition(":")
    if not sep or not table or not path_text:
        raise TrainError(f"--recipe takes FILE:TABLE (e.g. train/recipes/instaflow_sd15.toml:reflow), got {spec!r}")
    path = Path(path_text)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise TrainError(f"recipe file does not exist: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise TrainError(f"recipe {path} is not valid TOML: {e}") from None
    if not isinstance(doc.get(table), dict):
        tables = ", ".join(k for k, v in doc.items() if isinstance(v, dict))
        raise TrainError(f"recipe {path} has no table [{table}]; it has: {tables}")
    return path, table, doc[table]


def recipe_defaults(parser: argparse.ArgumentParser, spec: str) -> dict[str, Any]:
    """The parser defaults a recipe table sets (keys are flag names: ``max-steps`` or ``max_steps``); one line for
    a key the command does not have or a value of the wrong kind."""
    path, table, settings = load_recipe(spec)
    actions = {a.dest: a for a in parser._actions}
    out: dict[str, Any] = {"recipe": f"{path}:{table}"}
    for key, value in settings.items():
        dest = key.replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("help", "recipe"):
            raise TrainError(f"recipe {path} [{table}]: {parser.prog} has no --{key.replace('_', '-')}")
        try:
            if action.type is not None and not isinstance(value, bool):
                value = action.type(value)
        except (TypeError, ValueError):
            raise TrainError(f"recipe {path} [{table}]: {key} = {value!r} is not a valid value") from None
        if action.choices is not None and value not in action.choices:
            raise TrainError(f"recipe {path} [{table}]: {key} must be one of {', '.join(map(str, action.choices))}, "
                             f"got {value!r}")
        out[dest] = value
    return out
