"""Captioners: image name -> one short description, the raw material of SPN's positives.

SPN (Feng et al., arXiv 2404.11317) captions every training image with a multimodal LLM and
writes a modification text from the captions of two images. Here the captioner is pluggable;
``build_captioner(spec, ...)`` turns a ``--captioner`` value into one:

* ``scenes``: the synthetic benchmark's ground-truth scene captions (``ROOT/scenes/{split}.json``,
  ``{name: {"caption": str, ...}}``, written by ``cir synth``): a perfect captioner, so the
  benchmark measures the method and not a caption model. ``scenes:short`` gives each object's
  colour and shape only (2-10 words, like SPN's 8-word LLaVA captions), so that two captions fit
  a template in a short text tower instead of falling back to "{B}".
* ``file:PATH``: captions someone already has. JSON ``{name: caption}`` or a JSON list of
  objects with ``image``/``name``/``image_id`` and ``caption``; or TSV/CSV-free tab-separated
  ``name<TAB>caption`` lines (an optional ``image<TAB>caption`` header). A key matches an image
  by its name or by its file stem, so ``cir synth``'s ``pairs/train.tsv`` (relative paths) works.
* ``model:PATH``: a local Hugging Face ``transformers`` image-to-text folder (e.g. a BLIP
  captioning checkpoint), loaded with ``local_files_only=True`` through ``AutoProcessor`` and
  ``AutoModelForVision2Seq``. ``transformers`` is not a dependency of this package: without it
  this captioner is refused with a one-line error.
* ``python:MODULE:FUNCTION``: any image-to-text model a user wraps in a function
  ``f(images: list[PIL.Image.Image]) -> list[str]`` (importable from ``sys.path``), called in
  batches of ``batch_size``.

Every captioner implements :class:`Captioner`: ``captions(names, path_of) -> list[str]``. An
image it cannot caption is an error that names the image, never a silent drop.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable, Protocol, Sequence

from ..errors import ConfigError, DataError
from ..fileio import read_json, read_text
from ..synth.world import scene_from_dicts, short_caption

CAPTIONER_KINDS = ("scenes", "scenes:short", "file:PATH", "model:PATH", "python:MODULE:FUNCTION")


class Captioner(Protocol):
    name: str

    def captions(self, names: Sequence[str], path_of: Callable[[str], Path]) -> list[str]:
        """One caption per name, in order."""


def _clean(text: object, where: str) -> str:
    if not isinstance(text, str) or not " ".join(text.split()):
        raise DataError(f"{where}: caption must be a non-empty string, found {text!r}")
    return " ".join(text.split())


class TableCaptioner:
    """Captions looked up in a name -> caption table (scene files and caption files)."""

    def __init__(self, table: dict[str, str], source: str, name: str) -> None:
        self.table = table
        self.source = source
        self.name = name
        self._by_stem: dict[str, str] | None = None

    def _lookup(self, name: str) -> str | None:
        if name in self.table:
            return self.table[name]
        if self._by_stem is None:
            self._by_stem = {}
            for key, cap in self.table.items():
                self._by_stem.setdefault(Path(key).stem, cap)
        return self._by_stem.get(name) or self._by_stem.get(Path(name).stem)

    def captions(self, names: Sequence[str], path_of: Callable[[str], Path]) -> list[str]:
        out = []
        for n in names:
            cap = self._lookup(n)
            if cap is None:
                raise DataError(f"{self.source}: no caption for image {n!r}")
            out.append(cap)
        return out


def scene_captioner(root: str | Path, split: str, short: bool = False) -> TableCaptioner:
    """``short``: colour and shape per object only (``synth.world.short_caption``)."""
    path = Path(root) / "scenes" / f"{split}.json"
    if not path.is_file():
        raise ConfigError(f"captioner 'scenes' needs the synthetic benchmark's scene file {path} "
                          "(written by cir synth); for other data use file:PATH or model:PATH")
    data = read_json(path, "scene caption file")
    if not isinstance(data, dict):
        raise DataError("scene caption file must hold a JSON object {name: {caption, objects}}", path)
    table = {}
    for name, scene in data.items():
        cap = scene.get("caption") if isinstance(scene, dict) else None
        if short and cap is not None:
            try:
                cap = short_caption(scene_from_dicts(scene["objects"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(f"scene {name!r}: 'objects' must be a list of {{shape, color, size, row, col}} "
                                f"({exc})", path) from None
        table[name] = _clean(cap, f"{path}: scene {name!r}")
    return TableCaptioner(table, str(path), "scenes:short" if short else "scenes")


def file_captioner(path: str | Path) -> TableCaptioner:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("caption file not found", path)
    table: dict[str, str] = {}
    if path.suffix.lower() == ".json":
        data = read_json(path, "caption file")
        if isinstance(data, dict):
            for k, v in data.items():
                table[str(k)] = _clean(v, f"{path}: image {k!r}")
        elif isinstance(data, list):
            for i, row in enumerate(data):
                key = next((row.get(f) for f in ("image", "name", "image_id") if isinstance(row, dict) and f in row), None)
                if key is None:
                    raise DataError(f"entry {i}: expected an object with 'image' (or 'name'/'image_id') and 'caption'", path)
                table[str(key)] = _clean(row.get("caption"), f"{path}: entry {i}")
        else:
            raise DataError("caption file must hold {name: caption} or a list of {image, caption}", path)
    else:
        lines = read_text(path, "caption file").splitlines()
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise DataError(f"line {lineno}: expected 'name<TAB>caption', found {len(parts)} fields", path)
            if lineno == 1 and parts[0].strip().lower() in ("image", "name", "path") and parts[1].strip().lower() == "caption":
                continue
            table[parts[0].strip()] = _clean(parts[1], f"{path}: line {lineno}")
    if not table:
        raise DataError("caption file holds no captions", path)
    return TableCaptioner(table, str(path), f"file:{path}")


class CallableCaptioner:
    """Runs an images -> captions function in batches on PIL images."""

    def __init__(self, fn: Callable[[list], list[str]], name: str, batch_size: int = 16) -> None:
        self.fn = fn
        self.name = name
        self.batch_size = batch_size

    def captions(self, names: Sequence[str], path_of: Callable[[str], Path]) -> list[str]:
        from tqdm import tqdm

        from ..data.images import load_image

        out: list[str] = []
        names = list(names)
        for s in tqdm(range(0, len(names), self.batch_size), desc="captioning", leave=False):
            chunk = names[s:s + self.batch_size]
            images = [load_image(path_of(n)) for n in chunk]
            caps = list(self.fn(images))
            if len(caps) != len(chunk):
                raise ConfigError(f"captioner {self.name} returned {len(caps)} captions for {len(chunk)} images")
            out.extend(_clean(c, f"captioner {self.name}: image {n!r}") for n, c in zip(chunk, caps))
        return out


def hf_model_captioner(path: str | Path, device: str = "cpu", max_new_tokens: int = 30,
                       batch_size: int = 16) -> CallableCaptioner:
    """A local transformers image-to-text folder; nothing is downloaded."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError("captioner model folder not found (model:PATH needs a local transformers folder)", path)
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError("captioner model:PATH needs the 'transformers' package, which is not installed; "
                          "install it, or caption the images elsewhere and pass file:CAPTIONS.tsv") from None
    import torch
    from transformers import AutoProcessor
    try:  # transformers 5 renamed the image-to-text auto class
        from transformers import AutoModelForImageTextToText as AutoImageToText
    except ImportError:
        from transformers import AutoModelForVision2Seq as AutoImageToText

    try:
        processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
        model = AutoImageToText.from_pretrained(str(path), local_files_only=True).to(device).eval()
    except Exception as exc:  # transformers raises many types for a bad folder
        raise ConfigError(f"cannot load an image-to-text model from {path}: {' '.join(str(exc).split())[:200]}") from None

    @torch.no_grad()
    def run(images: list) -> list[str]:
        inputs = processor(images=images, return_tensors="pt").to(device)
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens)
        return processor.batch_decode(ids, skip_special_tokens=True)

    return CallableCaptioner(run, f"model:{path}", batch_size)


def python_captioner(spec: str, batch_size: int = 16) -> CallableCaptioner:
    module, _, func = spec.rpartition(":")
    if not module or not func:
        raise ConfigError(f"captioner python:{spec}: expected python:MODULE:FUNCTION")
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"captioner python:{spec}: cannot import ({' '.join(str(exc).split())[:200]})") from None
    if not callable(fn):
        raise ConfigError(f"captioner python:{spec}: {func} is not callable")
    return CallableCaptioner(fn, f"python:{spec}", batch_size)


def build_captioner(spec: str, root: str | Path, split: str, device: str = "cpu") -> Captioner:
    """``--captioner`` value -> captioner (see the module docstring for the kinds)."""
    if spec in ("scenes", "scenes:short"):
        return scene_captioner(root, split, short=spec == "scenes:short")
    kind, _, rest = spec.partition(":")
    if kind == "file" and rest:
        return file_captioner(rest)
    if kind == "model" and rest:
        return hf_model_captioner(rest, device)
    if kind == "python" and rest:
        return python_captioner(rest)
    raise ConfigError(f"unknown captioner {spec!r}; expected one of: {', '.join(CAPTIONER_KINDS)}")


def dump_captions(names: Sequence[str], captions: Sequence[str]) -> str:
    """Captions as a JSON object, for reuse with ``file:PATH``."""
    return json.dumps(dict(zip(names, captions)), indent=0) + "\n"
