"""Export manifests and TensorRT engine indexes: typed documents with one reader and one writer each.

An export folder holds its graphs and ``manifest.json`` (:class:`Manifest`: ONNX graphs from ``python -m
export.onnx``, or AOTInductor packages from ``python -m export.aoti``); TensorRT engines built from an ONNX export
are listed beside it in ``engines.json`` (:class:`EngineIndex`). Both record what they were made from
(:class:`Source`: the checkpoint's content hash and fingerprint, the VAE decoder, fused LoRAs, the model's shapes),
and each file with its hash and stamp (:mod:`runtime.identity`), so that a backend refuses, in one line, an export of
another checkpoint or a corrupted file.

Lives in ``runtime`` (the leaf package) because both the exporters (writing) and the backends (reading) need it.
The JSON layout is format 2; documents written by earlier versions of format 2 read unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from . import identity
from .checkpoints import OWN_DECODER, Checkpoint
from .errors import ExportError
from .files import atomic_write_json
from .specs import ModelDims, TensorSpec

MANIFEST = "manifest.json"  # an ONNX export (``python -m export.onnx``) or AOTInductor packages (``export.aoti``)
ENGINES = "engines.json"  # TensorRT engines (``python -m export.trt``), beside the ONNX export they come from
FORMAT = 2  # 2: ``latent.multiple`` and ``text.vocab_size`` (runtime.specs.ModelDims)

Kind = Literal["onnx", "aoti"]
#: TensorRT-style optimisation profile: input name -> (min, opt, max) shapes
Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def _json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so that fresh and stored values compare equal."""
    return json.loads(json.dumps(value))


def _profile(raw: Any) -> Profile:
    return {k: tuple(tuple(int(d) for d in s) for s in v) for k, v in (raw or {}).items()}  # type: ignore[misc]


def _profile_json(profile: Profile) -> dict[str, list[list[int]]]:
    return {k: [list(s) for s in v] for k, v in profile.items()}


# ------------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class CheckpointRecord:
    """The checkpoint an export was made from."""

    name: str
    path: str
    sha256: str  # Checkpoint.content_hash(): every file in full
    fingerprint: str  # Checkpoint.fingerprint(): the fast load-time identity (decoder and LoRAs included)
    class_name: str = ""

    @classmethod
    def of(cls, ckpt: Checkpoint, sha256: str) -> "CheckpointRecord":
        return cls(ckpt.name, str(ckpt.path), sha256, ckpt.fingerprint(), ckpt.class_name)


@dataclass(frozen=True)
class Source:
    """What an export holds: made from which checkpoint, with which VAE decoder and LoRAs, at which shapes."""

    checkpoint: CheckpointRecord
    dims: ModelDims
    scaling_factor: float
    shift_factor: float
    decoder: dict[str, str] = field(default_factory=lambda: dict(OWN_DECODER))
    loras: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "Source":
        ck = doc["checkpoint"]
        return cls(checkpoint=CheckpointRecord(str(ck.get("name", "")), str(ck.get("path", "")),
                                               str(ck.get("sha256", "")), str(ck.get("fingerprint", "")),
                                               str(ck.get("class_name", ""))),
                   dims=ModelDims.from_json(doc), scaling_factor=float(doc["vae"]["scaling_factor"]),
                   shift_factor=float(doc["vae"].get("shift_factor", 0.0)),
                   decoder=dict(doc.get("decoder") or OWN_DECODER), loras=tuple(doc.get("loras") or ()))

    def to_json(self) -> dict[str, Any]:
        return {"checkpoint": vars(self.checkpoint).copy(), **self.dims.to_json(),
                "vae": {"scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor},
                "decoder": dict(self.decoder), "loras": [dict(x) for x in self.loras]}

    @property
    def decoder_key(self) -> str:
        """What identifies the decoder in a graph's reuse key: its fingerprint (the class for the checkpoint's own)."""
        return str(self.decoder.get("fingerprint", self.decoder["class"]))

    @property
    def lora_keys(self) -> list[list[Any]]:
        """What identifies the fused LoRAs in a graph's reuse key: (sha256, scale) of each, in order."""
        return [[x["sha256"], x["scale"]] for x in self.loras]

    @property
    def tiny_decoder_path(self) -> str | None:
        """The folder of the tiny decoder this export holds, or None for the checkpoint's own VAE."""
        return self.decoder.get("path") if self.decoder.get("class") != OWN_DECODER["class"] else None

    @property
    def lora_refs(self) -> list[tuple[str, float]]:
        """The fused LoRAs as ``Pipeline.from_pretrained(lora=...)`` takes them."""
        return [(str(x["file"]), float(x["scale"])) for x in self.loras]

    def check_matches(self, ckpt: Checkpoint, folder: Path, command: str) -> None:
        """Refuse, in one line, an export made from another checkpoint, or with another decoder or other LoRAs
        than ``ckpt`` asks for; ``command`` (e.g. ``python -m export.onnx``) is how to make the right one."""
        held, wanted = self.decoder, ckpt.decoder_identity()
        if held.get("fingerprint") != wanted.get("fingerprint") or held.get("class") != wanted.get("class"):
            flag = f"--vae {ckpt.decoder.name}" if ckpt.decoder is not None else "without --vae"
            raise ExportError(f"{folder} was exported with {held.get('name')} ({held.get('class')}) as its decoder, "
                              f"not {wanted['name']}; re-export it {flag}")

        def names(loras: Any) -> list[str]:
            return [f"{Path(x['file']).name}:{x['scale']:g}" for x in loras]

        if [(x["sha256"], x["scale"]) for x in self.loras] != [(x["sha256"], x["scale"]) for x in ckpt.loras]:
            flags = " ".join(f"--lora {n}" for n in names(ckpt.loras)) or "without --lora"
            raise ExportError(f"{folder} holds the LoRAs [{', '.join(names(self.loras))}], not "
                              f"[{', '.join(names(ckpt.loras))}]; re-export it {flags}")
        if self.checkpoint.fingerprint != ckpt.fingerprint():
            raise ExportError(f"{folder} was exported from another checkpoint ({self.checkpoint.name}), not "
                              f"{ckpt.name}; re-export with `{command} --ckpt {ckpt.name} -o {folder} --force`")


@dataclass(frozen=True)
class ExportSettings:
    """How an export's graphs were made (``python -m export.onnx`` / ``export.aoti`` options)."""

    fp16: bool = False
    vae_fp32: bool = False  # with fp16: keep the VAE decoder in fp32 (fp16 overflow gives NaN/black images)
    opset: int = 17  # ONNX only
    dynamic_hw: bool = False
    fused: bool = False

    def dtype_of(self, component: str) -> torch.dtype:
        """The graph's precision (its model-dtype tensors). The fused graph stays fp16 with ``vae_fp32``: only its
        decoder nodes are kept in fp32 (:meth:`fp32_scopes`)."""
        if not self.fp16 or (self.vae_fp32 and component == "vae_decoder"):
            return torch.float32
        return torch.float16

    def fp32_scopes(self, component: str) -> tuple[str, ...]:
        """Node-name prefixes kept in fp32 inside an fp16 graph."""
        return ("/vae_decoder/",) if self.fp16 and self.vae_fp32 and component == "onestep" else ()

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "ExportSettings":
        names = {"fp16", "vae_fp32", "opset", "dynamic_hw", "fused"}
        return cls(**{k: v for k, v in raw.items() if k in names})


@dataclass(frozen=True)
class GraphEntry:
    """One exported graph: its file (with its external-data file, if any), hash, stamp, precision, tensors, what
    it was made with (``key``: reused only when it matches) and, for AOTInductor packages, the shapes it takes."""

    file: str
    sha256: str
    stamp: list[list[int]]
    dtype: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    key: dict[str, Any]
    external_data: bool = False
    profile: Profile = field(default_factory=dict)  # AOTInductor: the dynamic dims' ranges (min, opt, max)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "GraphEntry":
        return cls(file=str(raw["file"]), sha256=str(raw["sha256"]), stamp=list(raw.get("stamp") or []),
                   dtype=str(raw["dtype"]), inputs=tuple(map(TensorSpec.from_json, raw.get("inputs", ()))),
                   outputs=tuple(map(TensorSpec.from_json, raw.get("outputs", ()))), key=dict(raw.get("key") or {}),
                   external_data=bool(raw.get("external_data", False)), profile=_profile(raw.get("profile")))

    def to_json(self) -> dict[str, Any]:
        out = {"file": self.file, "sha256": self.sha256, "stamp": self.stamp, "external_data": self.external_data,
               "dtype": self.dtype, "inputs": [t.to_json() for t in self.inputs],
               "outputs": [t.to_json() for t in self.outputs], "key": _json(self.key)}
        if self.profile:
            out["profile"] = _profile_json(self.profile)
        return out

    @property
    def fp32_scopes(self) -> list[str]:
        return list(self.key.get("fp32_scopes", []))

    def files(self, folder: Path) -> list[Path]:
        """The graph file and its external-data file, if any."""
        data = folder / (self.file + ".data")
        return [folder / self.file] + ([data] if data.exists() else [])

    @classmethod
    def hash_of(cls, folder: Path, file: str) -> tuple[str, list[list[int]]]:
        """(sha256, stamp) of a graph's files as written now."""
        data = folder / (file + ".data")
        files = [folder / file] + ([data] if data.exists() else [])
        return identity.sha256_files(files), identity.stamp(files)

    def check(self, folder: Path, full: bool = False) -> None:
        """The graph's files are there and match the recorded hash (hashed only when their stamp changed, or with
        ``full``); else one line."""
        identity.check_files(self.files(folder), self.sha256, self.stamp, "re-run the export", full=full)


@dataclass(frozen=True)
class Verification:
    """The outcome of comparing every graph with PyTorch (``export.verify``)."""

    passed: bool
    rows: tuple[dict[str, Any], ...] = ()
    error: str = ""

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "Verification":
        return cls(bool(raw.get("passed")), tuple(raw.get("rows") or ()), str(raw.get("error", "")))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"passed": self.passed, "rows": list(self.rows)}
        if self.error:
            out["error"] = self.error
        return out


@dataclass(frozen=True)
class Target:
    """What an AOTInductor package runs on: compiled code is tied to the torch version and the device (for a GPU,
    its architecture)."""

    torch: str
    device: str  # "cpu" or "cuda"
    arch: str  # "sm_90" for a CUDA GPU; the CPU's machine and vector ISA otherwise
    gpu: str = ""

    def mismatch(self, here: "Target") -> str | None:
        """Why packages built for this target cannot run on ``here``, or None."""
        if (self.torch, self.device, self.arch) != (here.torch, here.device, here.arch):
            return (f"built with torch {self.torch} for {self.device} {self.arch}, this is torch {here.torch} on "
                    f"{here.device} {here.arch}")
        return None


# ------------------------------------------------------------------------------------------------- documents

#: between the failures of a verification's error (:func:`export.compare.compare`), which may hold "; " themselves
FAILURE_SEPARATOR = " | "


def first_failure(error: str) -> str:
    """The first of a verification's failures, whole, with how many more there are (an error written before the
    separator existed is one failure)."""
    parts = [p for p in error.split(FAILURE_SEPARATOR) if p]
    more = len(parts) - 1
    return (parts[0] if parts else "no detail") + (f"; and {more} more" if more > 0 else "")

@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` of an export folder: ONNX graphs (``kind="onnx"``) or AOTInductor packages (``"aoti"``,
    with their :class:`Target`)."""

    source: Source
    settings: ExportSettings
    exporter: dict[str, Any]
    created: str
    components: dict[str, GraphEntry]
    verification: Verification | None = None
    kind: Kind = "onnx"
    target: Target | None = None

    @property
    def dims(self) -> ModelDims:
        return self.source.dims

    def unusable_reason(self, folder: Path, required: tuple[str, ...], allow_unverified: bool = False
                        ) -> str | None:
        """Why the export in ``folder`` must not be run, or None: ``required`` graphs missing (interrupted), failed
        its verification, or never verified (``--no-verify``, or a verification that was killed). Only an export
        that passed is run, unless the caller explicitly allows an unverified one; a failed one never is."""
        missing = [n for n in required if n not in self.components]
        if missing:
            return (f"the export in {folder} lacks the {', '.join(missing)} graph(s) (interrupted?); re-run the "
                    "export")
        v = self.verification
        if v is not None and not v.passed:
            return (f"the export in {folder} failed its verification ({first_failure(v.error)}); re-export it, or "
                    "verify it again with `python -m export.verify`")
        if v is None and not allow_unverified:
            return (f"the export in {folder} was never verified (made with --no-verify, or its verification was "
                    f"interrupted); verify it with `python -m export.verify {folder}`, or run it anyway with "
                    "allow_unverified=True (CLI: --allow-unverified)")
        return None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"format": FORMAT, "kind": self.kind, **self.source.to_json(),
                               "settings": vars(self.settings).copy(), "exporter": dict(self.exporter),
                               "created": self.created,
                               "components": {n: e.to_json() for n, e in self.components.items()}}
        if self.verification is not None:
            doc["verification"] = self.verification.to_json()
        if self.target is not None:
            doc["target"] = vars(self.target).copy()
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "Manifest":
        v, t = doc.get("verification"), doc.get("target")
        return cls(source=Source.from_json(doc), settings=ExportSettings.from_json(doc["settings"]),
                   exporter=dict(doc.get("exporter") or {}), created=str(doc.get("created", "")),
                   components={n: GraphEntry.from_json(e) for n, e in doc["components"].items()},
                   verification=Verification.from_json(v) if isinstance(v, dict) else None,
                   kind=doc.get("kind", "onnx"), target=Target(**t) if isinstance(t, dict) else None)


@dataclass(frozen=True)
class EngineEntry:
    """One TensorRT engine: its plan file, hash and stamp, the ONNX graph it was built from, its precision and
    optimisation profile, and how far it was from PyTorch when built."""

    file: str
    sha256: str  # of the plan file itself
    stamp: list[list[int]]
    onnx_sha256: str
    precision: str
    fp32_scopes: list[str]
    profile: Profile
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_rel_err: float
    refittable: bool = False

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "EngineEntry":
        return cls(file=str(raw["file"]), sha256=str(raw["sha256"]), stamp=list(raw.get("stamp") or []),
                   onnx_sha256=str(raw.get("onnx_sha256", "")), precision=str(raw.get("precision", "")),
                   fp32_scopes=list(raw.get("fp32_scopes") or []), profile=_profile(raw["profile"]),
                   inputs=tuple(map(TensorSpec.from_json, raw.get("inputs", ()))),
                   outputs=tuple(map(TensorSpec.from_json, raw.get("outputs", ()))),
                   max_rel_err=float(raw.get("max_rel_err", float("nan"))), refittable=bool(raw.get("refittable")))

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "stamp": self.stamp, "onnx_sha256": self.onnx_sha256,
                "precision": self.precision, "fp32_scopes": list(self.fp32_scopes),
                "profile": _profile_json(self.profile), "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs], "max_rel_err": self.max_rel_err,
                "refittable": self.refittable}

    def check(self, folder: Path, full: bool = False) -> None:
        """The plan file is there and matches its hash (hashed only when its stamp changed); else one line."""
        identity.check_files([folder / self.file], self.sha256, self.stamp,
                             "rebuild with `python -m export.trt --force`", full=full,
                             digest=lambda files: identity.sha256_file(files[0]))


@dataclass(frozen=True)
class EngineIndex:
    """``engines.json``: the TensorRT engines of a folder, the TensorRT version and GPU they were built for."""

    source: Source
    tensorrt: str
    gpu: str
    components: dict[str, EngineEntry]

    @property
    def dims(self) -> ModelDims:
        return self.source.dims

    def mismatch(self, trt_version: str, gpu: str) -> str | None:
        """Why these engines cannot run here (engines are tied to the GPU model and TensorRT version), or None."""
        if (self.gpu, self.tensorrt) != (gpu, trt_version):
            return f"built for {self.gpu} with TensorRT {self.tensorrt}, this is {gpu} with TensorRT {trt_version}"
        return None

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "tensorrt": self.tensorrt, "gpu": self.gpu,
                "components": {n: e.to_json() for n, e in self.components.items()}, **self.source.to_json()}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "EngineIndex":
        return cls(source=Source.from_json(doc), tensorrt=str(doc["tensorrt"]), gpu=str(doc["gpu"]),
                   components={n: EngineEntry.from_json(e) for n, e in doc["components"].items()})


# ------------------------------------------------------------------------------------------ reading, writing
def read_manifest(folder: Path, file: str = MANIFEST) -> Manifest | None:
    """The manifest of ``folder`` (``file``: another document of the same format, such as an export's journal),
    None when it has none, or one line saying why it cannot be read."""
    path = Path(folder) / file
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"unreadable {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ExportError(f"{path} is not an instaflow-rt export manifest of format {FORMAT} (made by another "
                          "version?); re-run the export into a new folder, or with --force")
    missing = [k for k in ("checkpoint", "components", "latent", "text", "settings", "vae")
               if not isinstance(doc.get(k), dict)]
    if missing:
        raise ExportError(f"{path} is damaged (no {', '.join(missing)}); re-run the export into a new folder, or "
                          "with --force")
    try:
        return Manifest.from_json(doc)
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{path} is damaged ({type(e).__name__}: {e}); re-run the export into a new folder, or "
                          "with --force") from None


def write_manifest(folder: Path, manifest: Manifest, file: str = MANIFEST) -> None:
    """Atomic write (see :mod:`runtime.files`)."""
    atomic_write_json(Path(folder) / file, manifest.to_json())


def read_engines(folder: Path) -> EngineIndex:
    """The TensorRT engine index of ``folder`` (``engines.json``), or one line saying why it cannot be read."""
    path = Path(folder) / ENGINES
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"unreadable {path}: {type(e).__name__}; rebuild with `python -m export.trt`") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("components"), dict):
        raise ExportError(f"{path} is not an instaflow-rt engine index of format {FORMAT}; rebuild with "
                          "`python -m export.trt --force`")
    try:
        return EngineIndex.from_json(doc)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ExportError(f"{path} is damaged ({type(e).__name__}: {e}); rebuild with "
                          "`python -m export.trt --force`") from None


def write_engines(folder: Path, index: EngineIndex) -> None:
    """Atomic write (see :mod:`runtime.files`)."""
    atomic_write_json(Path(folder) / ENGINES, index.to_json())
