"""Export manifests (JSON) and content hashes: what was built from which checkpoint, with which tools.

Lives in ``runtime`` (the leaf package) because both the exporters (writing) and the runtime backends (reading,
refusing mismatches) need it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .checkpoints import OWN_DECODER, Checkpoint
from .errors import ExportError
from .files import atomic_write_json
from .identity import sha256_file, sha256_files, stamp

MANIFEST = "manifest.json"  # an ONNX export (``python -m export.onnx``)
ENGINES = "engines.json"  # TensorRT engines (``python -m export.trt``), beside the ONNX export they come from
FORMAT = 2  # 2: ``latent.multiple`` and ``text.vocab_size`` (runtime.specs.ModelDims)


def fingerprint(ckpt: Checkpoint) -> str:
    """:meth:`Checkpoint.fingerprint` (the fast load-time identity)."""
    return ckpt.fingerprint()


def checkpoint_hash(ckpt: Checkpoint) -> str:
    """:meth:`Checkpoint.content_hash` (every file hashed in full)."""
    return ckpt.content_hash()


def graph_files(folder: Path, file: str) -> list[Path]:
    """The .onnx file and its external-data file, if any."""
    files = [folder / file]
    data = folder / (file + ".data")
    return files + ([data] if data.exists() else [])


def files_hash(folder: Path, file: str) -> str:
    return sha256_files(graph_files(folder, file))


def read(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"unreadable {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ExportError(f"{path} is not an instaflow-rt export manifest of format {FORMAT} (made by another "
                          "version?); re-run the export into a new folder, or with --force")
    missing = [k for k in ("checkpoint", "components", "latent", "text", "settings")
               if not isinstance(doc.get(k), dict)]
    if missing:
        raise ExportError(f"{path} is damaged (no {', '.join(missing)}); re-run the export into a new folder, or "
                          "with --force")
    return doc


def read_engines(folder: Path) -> dict[str, Any]:
    """The TensorRT engine index of ``folder`` (``engines.json``), or one line saying why it cannot be read."""
    path = folder / ENGINES
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"unreadable {path}: {type(e).__name__}; rebuild with `python -m export.trt`") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("components"), dict):
        raise ExportError(f"{path} is not an instaflow-rt engine index of format {FORMAT}; rebuild with "
                          "`python -m export.trt --force`")
    return doc


def engines_mismatch(doc: dict[str, Any], trt_version: str, gpu: str) -> str | None:
    """Why engines cannot run here (TensorRT engines are tied to the GPU model and TensorRT version), or None."""
    built = (doc.get("gpu"), doc.get("tensorrt"))
    if built != (gpu, trt_version):
        return f"built for {built[0]} with TensorRT {built[1]}, this is {gpu} with TensorRT {trt_version}"
    return None


def write(folder: Path, doc: dict[str, Any]) -> None:
    """Atomic write (see :mod:`runtime.files`)."""
    atomic_write_json(folder / MANIFEST, doc)


def check_files(folder: Path, entry: dict[str, Any], full: bool = False) -> None:
    """Raise when a graph's files are missing or differ from the hash the manifest recorded (corruption).

    The files are hashed in full only when their stamp (:func:`stamp`) changed since the hash was recorded, or when
    ``full`` (``export.verify``) asks for it."""
    files = graph_files(folder, entry["file"])
    if not (folder / entry["file"]).exists() or any(not p.exists() for p in files):
        raise ExportError(f"{folder}: {entry['file']} is missing; re-run the export")
    if not full and entry.get("stamp") == stamp(files):
        return
    if files_hash(folder, entry["file"]) != entry["sha256"]:
        raise ExportError(f"{folder / entry['file']} does not match its manifest hash (corrupted or truncated); "
                          "delete it and re-run the export")


def check_file(path: Path, sha256: str, recorded_stamp: Any, what: str) -> None:
    """One file (an engine) against its recorded hash, hashed only when its stamp changed."""
    if not path.is_file():
        raise ExportError(f"{path} is missing; {what}")
    if recorded_stamp == stamp([path]):
        return
    if sha256_file(path) != sha256:
        raise ExportError(f"{path} does not match its manifest hash (corrupted or truncated); {what}")


def cache_root() -> Path:
    """Where exports live by default: ``$INSTAFLOW_CACHE`` or ``~/.cache/instaflow-rt``."""
    return Path(os.environ.get("INSTAFLOW_CACHE") or Path.home() / ".cache" / "instaflow-rt")


def default_export_dir(ckpt: Checkpoint, kind: str = "onnx") -> Path:
    """Default folder of a checkpoint's exports: ``<cache>/<kind>/<name>-<fingerprint[:12]>``."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(ckpt.name).name or "ckpt")
    return cache_root() / kind / f"{safe}-{fingerprint(ckpt)[:12]}"


def usable_export_problem(doc: dict[str, Any], folder: Path, allow_unverified: bool = False) -> str | None:
    """Why the ONNX export in ``folder`` must not be run, or None: interrupted, failed its verification, or never
    verified (``--no-verify``, or a verification that was killed). Only an export that passed is run, unless the
    caller explicitly allows an unverified one (``allow_unverified``); a failed one is never run."""
    missing = [n for n in ("text_encoder", "unet", "vae_decoder") if n not in doc.get("components", {})]
    if missing:
        return f"the export in {folder} lacks the {', '.join(missing)} graph(s) (interrupted?); re-run the export"
    verification = doc.get("verification")
    if verification is not None and not verification.get("passed"):
        return (f"the export in {folder} failed its verification ({str(verification.get('error', ''))[:160]}); "
                "re-export it, or verify it again with `python -m export.verify`")
    if verification is None and not allow_unverified:
        return (f"the export in {folder} was never verified (made with --no-verify, or its verification was "
                f"interrupted); verify it with `python -m export.verify {folder}`, or run it anyway with "
                "allow_unverified=True (CLI: --allow-unverified)")
    return None


def decoder_identity(ckpt: Checkpoint) -> dict[str, str]:
    """:meth:`Checkpoint.decoder_identity`."""
    return ckpt.decoder_identity()


def check_decoder_matches(doc: dict[str, Any], ckpt: Checkpoint, folder: Path) -> None:
    """Refuse an export made with another VAE decoder than the one asked for (one line)."""
    held, wanted = doc.get("decoder", OWN_DECODER), decoder_identity(ckpt)
    if held.get("fingerprint") != wanted.get("fingerprint") or held.get("class") != wanted.get("class"):
        flag = f"--vae {ckpt.decoder.name}" if ckpt.decoder is not None else "without --vae"
        raise ExportError(f"{folder} was exported with {held.get('name')} ({held.get('class')}) as its decoder, not "
                          f"{wanted['name']}; re-export it {flag}")


def check_loras_match(doc: dict[str, Any], ckpt: Checkpoint, folder: Path) -> None:
    """Refuse an export whose fused LoRAs (file contents and scales) are not the ones asked for (one line)."""
    def names(loras: Any) -> list[str]:
        return [f"{Path(x['file']).name}:{x['scale']:g}" for x in loras]

    held, wanted = doc.get("loras", []), list(ckpt.loras)
    if [(x["sha256"], x["scale"]) for x in held] != [(x["sha256"], x["scale"]) for x in wanted]:
        flags = " ".join(f"--lora {n}" for n in names(wanted)) or "without --lora"
        raise ExportError(f"{folder} holds the LoRAs [{', '.join(names(held))}], not [{', '.join(names(wanted))}]; "
                          f"re-export it {flags}")


def check_export_matches(doc: dict[str, Any], ckpt: Checkpoint, folder: Path) -> None:
    """Refuse an export made from another checkpoint, or with another decoder or other LoRAs (one line)."""
    check_decoder_matches(doc, ckpt, folder)
    check_loras_match(doc, ckpt, folder)
    made_from = doc.get("checkpoint", {})
    if made_from.get("fingerprint") != fingerprint(ckpt):
        raise ExportError(f"{folder} was exported from another checkpoint ({made_from.get('name')}), not "
                          f"{ckpt.name}; re-export with `python -m export.onnx --ckpt {ckpt.name} -o {folder} --force`")
