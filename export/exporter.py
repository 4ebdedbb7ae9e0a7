"""What every export command shares: the export folder, graphs made or reused, verification, one manifest.

An :class:`Exporter` (ONNX graphs: :mod:`export.onnx`; AOTInductor packages: :mod:`export.aoti`) says how one graph
is made and what it was made with (its *key*: a graph is reused only when its key and files match) and how the
graphs are verified. :meth:`Exporter.run` does the rest, the same way for every kind:

1. resolve the checkpoint (with its tiny decoder and LoRAs) and hash its content; refuse another checkpoint's export
   in the folder (``force`` replaces it);
2. make or reuse each graph; after each one made, a journal (``.manifest.partial.json``) records the progress, so a
   killed run resumes where it stopped; ``manifest.json`` is taken away before the first file changes, so a half-made
   folder is never taken for an export;
3. verify (unless every graph was reused with an earlier passed verification, or ``verify=False``);
4. write ``manifest.json`` once, with the verification's result, and drop the journal; a failed verification is
   recorded, then raised.
"""

from __future__ import annotations

import abc
import os
import shutil
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Sequence

from runtime.cache import default_export_dir
from runtime.checkpoints import Checkpoint
from runtime.errors import ExportError
from runtime.manifest import (MANIFEST, CheckpointRecord, ExportSettings, GraphEntry, Kind, Manifest, Source, Target,
                              Verification, read_manifest, write_manifest)
from runtime.models import Components, load_components, resolve_checkpoint
from runtime.specs import COMPONENTS, ComponentSpec, ModelDims, component_specs, specs_by_name

#: progress of an export that has not finished (same format as the manifest; never read by the backends)
JOURNAL = ".manifest.partial.json"


def log(msg: str) -> None:
    print(msg, flush=True)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Exporter(abc.ABC):
    """Makes the graphs of one kind of export; :meth:`run` is the shared flow (module docstring)."""

    kind: ClassVar[Kind]
    #: the command line that runs this exporter (named in messages)
    command: ClassVar[str]

    def __init__(self, settings: ExportSettings) -> None:
        self.settings = settings

    # ------------------------------------------------------------------------------------ what a kind says
    def check_settings(self) -> None:
        """One line for settings this kind cannot honour."""
        if self.settings.vae_fp32 and not self.settings.fp16:
            raise ExportError("--vae-fp32 only makes sense with --fp16")

    @abc.abstractmethod
    def make(self, spec: ComponentSpec, components: Components, out: Path, key: dict[str, Any]) -> GraphEntry:
        """Make the graph of ``spec`` in ``out`` (written through a temporary name, so a killed run leaves no
        half-written file under the final name) and return its manifest entry, with ``key``."""

    @abc.abstractmethod
    def verify(self, out: Path, manifest: Manifest, components: Components) -> Verification:
        """Compare every graph of ``manifest`` with PyTorch; the outcome (passed or not, with one line of error)."""

    def key(self, spec: ComponentSpec, source: Source) -> dict[str, Any]:
        """What a graph is made with; a graph is reused only when this matches (the decoder for the graphs holding
        one, the LoRAs for those holding the UNet or the text encoder)."""
        s = self.settings
        key: dict[str, Any] = {"dtype": str(s.dtype_of(spec.name)).replace("torch.", ""), "opset": s.opset,
                               "fp32_scopes": list(s.fp32_scopes(spec.name)), "dynamic_hw": s.dynamic_hw,
                               **self.versions()}
        if spec.name in ("vae_decoder", "onestep"):
            key["decoder"] = source.decoder_key
        if spec.name != "vae_decoder" and source.loras:
            key["loras"] = source.lora_keys
        return key

    def versions(self) -> dict[str, str]:
        """Tool versions recorded in the manifest and in every graph's key."""
        import torch

        return {"torch": torch.__version__.split("+")[0]}

    def exporter_info(self) -> dict[str, Any]:
        return {"name": self.kind, **self.versions()}

    def default_folder(self, checkpoint: Checkpoint) -> Path:
        """Where the export goes without ``-o``: the export cache, where the backend of this kind looks."""
        return default_export_dir(checkpoint, self.kind)

    def target(self) -> Target | None:
        """What the graphs run on, when they are tied to it (AOTInductor); None for portable graphs."""
        return None

    def load(self, checkpoint: Checkpoint) -> Components:
        """The components the graphs are made from (fp32 on the CPU by default)."""
        import torch

        return load_components(checkpoint, device="cpu", dtype=torch.float32)

    # --------------------------------------------------------------------------------------------- the flow
    def run(self, ckpt: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, force: bool = False,
            verify: bool = True, only: Sequence[str] | None = None, vae: str | None = None, lora: Any = None
            ) -> Manifest:
        """Export (or reuse) the graphs of ``ckpt`` into ``out`` (all, or those named in ``only``), verify them, and
        return the manifest written (see the module docstring). ``out`` defaults to the export cache, where
        ``Pipeline.from_pretrained`` finds the export (:func:`runtime.cache.default_export_dir` of this kind)."""
        self.check_settings()
        unknown = sorted(set(only or ()) - set(COMPONENTS))
        if unknown:
            raise ExportError(f"unknown component(s) {', '.join(unknown)}; choose from {', '.join(COMPONENTS)}")
        if out is not None and Path(out).exists() and not Path(out).is_dir():  # before a download
            raise ExportError(f"output path is a file, not a folder: {out}")
        t0 = time.perf_counter()
        checkpoint = resolve_checkpoint(ckpt, vae, lora)
        out = Path(out) if out is not None else self.default_folder(checkpoint)
        ckpt_hash = checkpoint.content_hash()
        log(f"[hash] {checkpoint.name}: {ckpt_hash[:12]} ({time.perf_counter() - t0:.1f} s)")
        check_writable(out)
        old = self._previous(out, ckpt_hash, force)
        components = self.load(checkpoint)
        source = Source(CheckpointRecord.of(checkpoint, ckpt_hash), ModelDims.of(components),
                        components.scaling_factor, components.shift_factor, checkpoint.decoder_identity(),
                        tuple(checkpoint.loras))
        specs = ([s for s in component_specs(source.dims, fused=True) if s.name in only] if only else
                 component_specs(source.dims, fused=self.settings.fused))
        graphs = dict(old.components) if old else {}  # graphs of earlier runs stay listed
        reused = []
        for spec in specs:
            key = self.key(spec, source)
            entry = self._reusable(old, spec.name, key, out)
            reused.append(entry is not None)
            if entry is None:
                (out / MANIFEST).unlink(missing_ok=True)  # the folder is changing: not an export until written again
                t = time.perf_counter()
                entry = self.make(spec, components, out, key)
                size = sum(f.stat().st_size for f in entry.files(out)) / 2**20
                log(f"[export] {spec.name}: {entry.file} {size:,.1f} MB in {time.perf_counter() - t:.1f} s")
                graphs[spec.name] = entry
                self._journal(out, source, graphs)
            graphs[spec.name] = entry
        graphs = self._drop_stale(out, graphs, source, keep={s.name for s in specs})
        manifest = Manifest(source=source, settings=self.settings, exporter=self.exporter_info(), created=now(),
                            components=graphs, kind=self.kind, target=self.target())
        earlier = old.verification if old else None
        if all(reused) and earlier is not None and earlier.passed and set(graphs) == set(old.components):
            manifest = replace(manifest, verification=earlier)  # the same files, hash-checked: verified already
            log("[verify] every graph reused (hash ok): earlier verification kept")
        elif verify:
            manifest = replace(manifest, verification=self.verify(out, manifest, components))
        write_manifest(out, manifest)  # the one write, with the verification's outcome
        (out / JOURNAL).unlink(missing_ok=True)
        if manifest.verification is not None and not manifest.verification.passed:
            raise ExportError(manifest.verification.error)
        log(f"[done] {out} in {time.perf_counter() - t0:.1f} s")
        return manifest

    # -------------------------------------------------------------------------------------------- internals
    def _previous(self, out: Path, ckpt_hash: str, force: bool) -> Manifest | None:
        """The export already in ``out`` (finished, or the journal of a killed run), whose graphs can be reused;
        another checkpoint's (or kind's) export is refused, or with ``force`` removed. Temporary files of a killed
        run are removed."""
        for name in COMPONENTS:
            for tmp in out.glob(f".{name}.*"):
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        try:
            old = read_manifest(out)
            if old is None and (out / JOURNAL).is_file():
                old = _read_journal(out)
        except ExportError:
            if not force:
                raise
            (out / MANIFEST).unlink(missing_ok=True)  # --force replaces a damaged or foreign manifest
            (out / JOURNAL).unlink(missing_ok=True)
            return None
        if old is None:
            return None
        other = (old.source.checkpoint.name if old.source.checkpoint.sha256 != ckpt_hash else
                 f"{old.kind}, not {self.kind}" if old.kind != self.kind else None)
        if other is None:
            return old
        if not force:
            raise ExportError(f"{out} holds an export of another checkpoint or kind ({other}); choose another "
                              "folder or pass --force to replace it")
        for entry in old.components.values():
            for f in entry.files(out):
                f.unlink(missing_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)
        (out / JOURNAL).unlink(missing_ok=True)
        return None

    @staticmethod
    def _reusable(old: Manifest | None, name: str, key: dict[str, Any], out: Path) -> GraphEntry | None:
        prev = old.components.get(name) if old else None
        if prev is None or prev.key != key:
            return None
        try:
            prev.check(out)
        except ExportError as e:
            log(f"[export] {name}: re-exporting ({e})")
            return None
        log(f"[export] {name}: cached ({prev.file}, hash ok)")
        return prev

    def _drop_stale(self, out: Path, graphs: dict[str, GraphEntry], source: Source, keep: set[str]
                    ) -> dict[str, GraphEntry]:
        """Graphs of earlier runs stay only if they were made with the current settings (another ``--only`` run);
        others (e.g. a static fused graph after a ``--dynamic-hw`` re-export without ``--fused``) are deleted, so
        the manifest describes exactly what the folder holds, all of one kind."""
        specs = specs_by_name(source.dims)
        kept = {}
        for name, entry in graphs.items():
            if name in keep or (name in specs and entry.key == self.key(specs[name], source)):
                kept[name] = entry
                continue
            for f in entry.files(out):
                f.unlink(missing_ok=True)
            log(f"[export] {name}: removed (made with other settings)")
        return kept

    def _journal(self, out: Path, source: Source, graphs: dict[str, GraphEntry]) -> None:
        journal = Manifest(source=source, settings=self.settings, exporter=self.exporter_info(), created=now(),
                           components=dict(graphs), kind=self.kind, target=self.target())
        write_manifest(out, journal, JOURNAL)


def latent_size_of(ckpt: str | os.PathLike[str], height: int | None, width: int | None, static: bool = False,
                   vae: str | None = None) -> tuple[int, int]:
    """The latent size an export of ``ckpt`` is built around, from ``--height``/``--width`` in pixels (default: the
    checkpoint's), checked in one line before any work (:meth:`runtime.specs.ModelDims.export_size`; configs only
    are read)."""
    dims = ModelDims.of(load_components(resolve_checkpoint(ckpt, vae), weights=False))
    return dims.export_size(height, width, static)


def _read_journal(out: Path) -> Manifest | None:
    """The journal of a killed run, or None when it cannot be read (then everything is made again)."""
    try:
        return read_manifest(out, JOURNAL)
    except ExportError:
        (out / JOURNAL).unlink(missing_ok=True)
        return None


def check_writable(out: Path) -> None:
    """Create ``out`` and probe it with a real file, so that a read-only folder is one line before minutes of work."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ExportError(f"cannot write into {out}: {e.strerror or e}") from None


def check_free_space(out: Path, name: str, module: Any, factor: float = 1.1) -> None:
    """Exporters write the fp32 weights (3.4 GB for SD's UNet) before any conversion, and a full disk surfaces as
    "Could not open file" deep in torch: say it in one line before the work instead."""
    need = int(factor * sum(t.numel() * 4 for t in (*module.parameters(), *module.buffers()))) + 2**26
    free = shutil.disk_usage(out).free
    if free < need:
        raise ExportError(f"not enough disk space in {out} to export {name}: it needs about {need / 2**30:.1f} GiB "
                          f"free (its fp32 weights while converting), {free / 2**30:.1f} GiB left")
