"""SPN positives: new training triplets from image pairs and their captions, written as extra
training files in the dataset's own format (``cir spn generate``).

Following SPN (Feng et al., "Improving Composed Image Retrieval via Contrastive Learning with
Scaling Positives and Negatives", arXiv 2404.11317; public code github.com/BUAADreamer/SPN4CIR,
``zscir/get_cir_data.py`` and ``zscir/deduplicate_images.py``):

* images are de-duplicated first (SPN compares pixels pairwise; here a sha256 of each file's
  bytes groups identical files in one pass, and only the first name of a group is used);
* each reference image A gets ``per_image`` partners B (SPN ``--k``, default 1) drawn uniformly
  from a window of its image-to-image similarity ranks (SPN ``--i2i_rank``/``--i2i_rank_max``:
  10000-15000 on CIRR and 10000-20000 on FashionIQ for CLIP4Cir; no window, i.e. any other
  image, for BLIP). ``refer_only`` keeps only images that are references in the original
  triplets (SPN ``--refer``).

  *Rank origin.* Ranks here count the *other* images: rank 0 is the nearest neighbour and the
  image itself is never a candidate. SPN4CIR ranks with ``argsort`` over a similarity matrix
  whose diagonal is kept (``zscir/get_cir_data.py`` on ``sims.pth``), so the image itself sits
  at its rank 0 and SPN's window ``[lo, hi)`` is ``[lo - 1, hi - 1)`` here (its CIRR window
  10000-15000 is ``--window 9999,14999``). The manifest states it (``rank_origin``).

  *Ranking features (a documented choice).* SPN4CIR ranks with a separate image model, not the
  CIR model it trains: UNICOM ViT-L/14 image features (``zscir/srm_utils.py``: ``SRMCMRModel``,
  ``sims_intra_i2i = srm_image_feats @ srm_image_feats.T``). Here the features come from the
  image tower the command is given: ``--encoder`` (any tower, e.g. a separate open_clip model:
  SPN's setting) or ``--model`` (a trained run's gallery embedding: the features the bank stage
  will score with; our default use, cheaper, no second model). ``ranked_by`` in the manifest
  records which; the vectors are cached (``cache.FeatureCache``);
* the modification texts come from the captions of A and B through SPN's templates
  ``"{B} instead of {A}"``, ``"Unlike {A}, I want {B}"``, ``"{B}"`` (``--p_list``; default
  templates 0 and 1, FashionIQ runs use 2). As in SPN4CIR, each triplet stores one text per
  allowed template (a text that does not fit the text tower's context becomes ``"{B}"``: SPN's
  ``clip.tokenize`` fails -> ``caption2``, so a long "Unlike {A}, ..." never loses its {B} to
  truncation; a text of exactly the context length fits; the tokenizer that decides is the text
  tower's, ``--text-encoder``, by default the ranking model's), and the template is drawn each time
  the triplet is read (SPN ``random.choice(captions)`` in ``clip4cir/data_utils.py``; here
  ``caption_choices``, drawn by ``data.triplets.TripletDataset`` per epoch and index from the
  run's seed, so runs repeat);
* optionally ``max_triplets`` are kept at random (SPN ``--K``).

Output (written atomically, next to the originals, read by the normal loaders unchanged):

* CIRR: ``captions/cap.rc2.{out}.json`` + ``image_splits/split.rc2.{out}.json`` whose paths are
  copied from the source split file (the same image files). ``caption`` is the first template's
  text (what CIRR's format and evaluation read); ``caption_choices`` lists every template's
  text (what training draws from). Each triplet gets a valid img_set:
  ``members = [reference, target] + up to 4 nearest neighbours of the reference`` (the CIRR
  subset is "visually similar images"), ``reference_rank`` 0, ``target_rank`` 1, ``id`` = pairid.
* FashionIQ: per category ``captions/cap.{cat}.{out}.json`` + ``image_splits/split.{cat}.{out}.json``;
  partners are drawn within the category. ``caption_choices`` lists every template's text;
  ``captions`` (two entries, as the format requires) repeats the first two of them. The loader
  never joins a generated entry's texts with "and" (SPN4CIR applies its "c1 and c2" policy only
  to the original triplets, ``index < self.N``): it reads ``caption_choices``.
* ``spn.{out}.json`` at the root: the settings, counts and the duplicates removed. It is
  written first (marking the output as ours, so a rerun may replace it) and again last.

The same inputs and seed give byte-identical files.
"""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.base import CIRSplit
from ..errors import ConfigError, DataError
from ..fileio import atomic_write_json, atomic_write_text, read_json
from .captioners import Captioner

GENERATOR = "composed_retrieval.spn"
VERSION = 2          # 2: every template's text stored (caption_choices), drawn when read
#: SPN4CIR zscir/get_cir_data.py prompt_list, with {0} -> {A} (reference caption), {1} -> {B}
TEMPLATES = ("{B} instead of {A}", "Unlike {A}, I want {B}", "{B}")
SUBSET_OTHERS = 4          # CIRR img_sets have 6 members: reference, target and 4 more
RESERVED_SPLITS = ("train", "val", "test", "test1", "heldout")
RANK_ORIGIN = ("ranks count the other images: 0 = the nearest neighbour, the image itself is never a "
               "partner (SPN4CIR counts the image itself as rank 0: its window [lo, hi) is [lo-1, hi-1) here)")


@dataclass
class SPNOptions:
    dataset: str
    root: str
    split: str = "train"
    out_split: str = "spn"
    window: tuple[int, int] | None = (20, 100)   # ranks among the other images, [lo, hi)
    per_image: int = 1
    max_triplets: int | None = None
    seed: int = 0
    templates: tuple[int, ...] = (0, 1)
    refer_only: bool = False
    image_root: str | None = None
    categories: list[str] | None = None
    captioner: str = ""                          # recorded in the manifest
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.dataset not in ("cirr", "fashioniq"):
            raise ConfigError(f"cir spn generate supports cirr and fashioniq, not {self.dataset!r}")
        if self.out_split == self.split or self.out_split in RESERVED_SPLITS:
            raise ConfigError(f"--out-split {self.out_split!r} would replace an original split; "
                              "choose a new name such as 'spn'")
        if self.window is not None:
            lo, hi = self.window
            if lo < 0 or hi <= lo:
                raise ConfigError(f"--window {lo},{hi}: expected 0 <= lo < hi (ranks among the other images)")
        if self.per_image < 1:
            raise ConfigError(f"--per-image must be at least 1, got {self.per_image}")
        if self.max_triplets is not None and self.max_triplets < 1:
            raise ConfigError(f"--max-triplets must be at least 1, got {self.max_triplets}")
        if not self.templates or any(t not in range(len(TEMPLATES)) for t in self.templates):
            raise ConfigError(f"--templates: expected indices among 0..{len(TEMPLATES) - 1} "
                              f"({'; '.join(f'{i}: {t}' for i, t in enumerate(TEMPLATES))})")


def parse_window(text: str | None) -> tuple[int, int] | None:
    """``"lo,hi"`` -> (lo, hi); ``"all"``/``None`` -> no window (any other image)."""
    if text is None or text.strip().lower() in ("all", "none", ""):
        return None
    try:
        lo, hi = (int(p) for p in text.split(","))
    except ValueError:
        raise ConfigError(f"--window {text!r}: expected two integers 'lo,hi' (e.g. 20,100) or 'all'") from None
    return lo, hi


# ---- duplicates -------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise DataError(f"cannot read image ({exc.strerror})", path) from None
    return h.hexdigest()


def content_groups(names: Sequence[str], path_of: Callable[[str], Path], workers: int = 8,
                   memo: dict[Path, str] | None = None) -> dict[str, str]:
    """name -> the first name (in ``names`` order) whose file has the same bytes."""
    memo = {} if memo is None else memo
    paths = [Path(path_of(n)) for n in names]
    todo = [p for p in dict.fromkeys(paths) if p not in memo]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:   # file reads release the GIL
        for p, digest in zip(todo, pool.map(file_sha256, todo)):
            memo[p] = digest
    first: dict[str, str] = {}
    canonical = {}
    for n, p in zip(names, paths):
        canonical[n] = first.setdefault(memo[p], n)
    return canonical


# ---- ranks ------------------------------------------------------------------------------------
@torch.no_grad()
def rank_windows(vectors: torch.Tensor, window: tuple[int, int] | None, near: int,
                 chunk: int = 1024) -> tuple[list[np.ndarray] | None, np.ndarray]:
    """For each row: the indices at ranks [lo, hi) among the other rows (None: no window) and
    its ``near`` nearest other rows. Chunked, so memory is ``chunk x N``, never ``N x N``."""
    n = vectors.shape[0]
    others = n - 1
    hi = 0
    if window is not None:
        lo, hi = window[0], min(window[1], others)
        if lo >= hi:
            raise ConfigError(f"--window {window[0]},{window[1]}: only {others} other images, so the window "
                              "is empty; lower it (ranks count the other unique images)")
    k = min(max(hi, near), others)
    windows: list[np.ndarray] | None = [] if window is not None else None
    nearest = np.zeros((n, min(near, others)), dtype=np.int64)
    for s in range(0, n, chunk):
        sims = vectors[s:s + chunk] @ vectors.t()
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + s] = -float("inf")   # an image is not its own partner
        top = sims.topk(k, dim=1, sorted=True).indices.cpu().numpy()
        nearest[s:s + chunk] = top[:, :nearest.shape[1]]
        if windows is not None:
            windows.extend(top[:, window[0]:hi])
    return windows, nearest


# ---- the generator ----------------------------------------------------------------------------
@dataclass
class _Group:
    """One source split (CIRR) or one FashionIQ category."""

    split: CIRSplit
    unique: list[str]
    index: dict[str, int]
    nearest: np.ndarray
    pairs: list[tuple[int, int]]


def _embed(encode: Callable[[CIRSplit, list[str]], torch.Tensor], split: CIRSplit, names: list[str]) -> torch.Tensor:
    v = encode(split, names).float()
    if v.shape[0] != len(names):
        raise DataError(f"features of {v.shape[0]} images for {len(names)} names in the {split.split} split")
    return F.normalize(v, dim=-1)


def generate(opts: SPNOptions, captioner: Captioner,
             encode: Callable[[CIRSplit, list[str]], torch.Tensor], progress: bool = True,
             fits: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """Generate and write the extra training files; returns the manifest.

    ``encode(split, names) -> [N, d]`` gives image features for similarity ranks (the command
    passes cached features of a trained run's or a plain encoder's image tower). ``fits(text)``
    says whether a text fits the text tower's context (None: every text fits).
    """
    from ..data.registry import load_splits

    opts.check()
    root = Path(opts.root)
    options: dict[str, Any] = {"caption_policy": "eval"} if opts.dataset == "fashioniq" else {}
    splits = load_splits(opts.dataset, root, opts.split, image_root=opts.image_root,
                         categories=opts.categories if opts.dataset == "fashioniq" else None, **options)
    outputs = _output_files(opts, splits)
    manifest_path = root / f"spn.{opts.out_split}.json"
    _check_overwrite(outputs, manifest_path)

    rng = np.random.default_rng([opts.seed, 0x5B4])
    memo: dict[Path, str] = {}
    groups: list[_Group] = []
    removed: list[list[str]] = []
    for split in splits:
        names = split.all_image_names()
        canonical = content_groups(names, split.image_path, memo=memo)
        unique = [n for n in names if canonical[n] == n]
        removed += [[n, canonical[n]] for n in names if canonical[n] != n]
        if len(unique) < 2:
            raise DataError(f"the {split.dataset} {split.category or ''} {split.split} split has "
                            f"{len(unique)} unique image(s); pairs need at least 2")
        windows, nearest = rank_windows(_embed(encode, split, unique), opts.window, SUBSET_OTHERS + 1)
        index = {n: i for i, n in enumerate(unique)}
        if opts.refer_only:
            refs = list(dict.fromkeys(index[canonical[q["reference"]]] for q in split.queries))
        else:
            refs = list(range(len(unique)))
        pairs = []
        for i in refs:
            cands = windows[i] if windows is not None else np.delete(np.arange(len(unique)), i)
            take = min(opts.per_image, len(cands))
            for j in rng.choice(cands, size=take, replace=False):
                pairs.append((i, int(j)))
        groups.append(_Group(split, unique, index, nearest, pairs))

    total = sum(len(g.pairs) for g in groups)
    if opts.max_triplets is not None and opts.max_triplets < total:
        keep = set(rng.choice(total, size=opts.max_triplets, replace=False).tolist())
        offset = 0
        for g in groups:
            n = len(g.pairs)
            g.pairs = [p for k, p in enumerate(g.pairs, offset) if k in keep]
            offset += n
    empty = [g.split.category for g in groups if not g.pairs and opts.dataset == "fashioniq"]
    if empty:
        raise ConfigError(f"no triplets left for FashionIQ categor{'y' if len(empty) == 1 else 'ies'} "
                          f"{', '.join(map(str, empty))} (a category file with no images does not load); "
                          "raise --max-triplets or choose --categories")
    manifest = {"generator": GENERATOR, "version": VERSION, "status": "writing",
                "options": {k: v for k, v in asdict(opts).items() if k not in ("root", "image_root", "extra")},
                "rank_origin": RANK_ORIGIN, **opts.extra}
    atomic_write_json(manifest_path, manifest)

    counts = {}
    fallbacks = [0]
    for g in groups:
        used = sorted({n for p in g.pairs for n in p})
        caps = dict(zip(used, captioner.captions([g.unique[i] for i in used], g.split.image_path)))
        texts = [_texts(opts, caps[i], caps[j], fits, fallbacks) for i, j in g.pairs]
        if opts.dataset == "cirr":
            _write_cirr(opts, g, texts, outputs[0])
        else:
            _write_fashioniq(opts, g, texts, outputs[g.split.category])
        counts[g.split.category or g.split.split] = {
            "images": len(g.split.all_image_names()), "unique_images": len(g.unique),
            "triplets": len(g.pairs)}
    manifest.update({"status": "complete", "triplets": counts,
                     "total_triplets": sum(c["triplets"] for c in counts.values()),
                     "texts_shortened_to_B": fallbacks[0],
                     "duplicates_removed": removed,
                     "files": sorted(str(p.relative_to(root)) for pair in outputs.values() for p in pair)})
    atomic_write_json(manifest_path, manifest)
    return manifest


def _texts(opts: SPNOptions, a: str, b: str, fits: Callable[[str], bool] | None = None,
           fallbacks: list[int] | None = None) -> list[str]:
    """One modification text per allowed template, in ``opts.templates`` order (SPN4CIR's
    ``get_captions``); a text too long for the text tower becomes ``"{B}"`` (the target's
    caption), as in SPN. Which one a training step sees is drawn when the triplet is read."""
    out = []
    for t in opts.templates:
        text = TEMPLATES[int(t)].format(A=a, B=b)
        if fits is not None and not fits(text):
            text = TEMPLATES[2].format(A=a, B=b)
            if fallbacks is not None:
                fallbacks[0] += 1
        out.append(text)
    return out


def _output_files(opts: SPNOptions, splits: list[CIRSplit]) -> dict[Any, tuple[Path, Path]]:
    from ..data.cirr import cirr_files
    from ..data.fashioniq import fashioniq_files

    if opts.dataset == "cirr":
        return {0: cirr_files(opts.root, opts.out_split)}
    return {s.category: fashioniq_files(opts.root, opts.out_split, s.category) for s in splits}


def _check_overwrite(outputs: dict[Any, tuple[Path, Path]], manifest_path: Path) -> None:
    existing = [p for pair in outputs.values() for p in pair if p.exists()]
    if not existing:
        return
    ours = False
    if manifest_path.is_file():
        meta = read_json(manifest_path, "SPN manifest")
        ours = isinstance(meta, dict) and meta.get("generator") == GENERATOR
    if not ours:
        raise ConfigError(f"{existing[0]} exists and was not written by cir spn generate (no {manifest_path.name}); "
                          "choose another --out-split or remove the file")


def _dump(obj: Any) -> str:
    return json.dumps(obj) + "\n"


def _write_cirr(opts: SPNOptions, g: _Group, texts: list[list[str]], files: tuple[Path, Path]) -> None:
    from ..data.cirr import cirr_files

    source = read_json(cirr_files(opts.root, opts.split)[1], "CIRR image split file")
    rows, used = [], {}
    for pairid, ((i, j), text) in enumerate(zip(g.pairs, texts)):
        ref, tgt = g.unique[i], g.unique[j]
        others = [g.unique[m] for m in g.nearest[i] if m != j][:SUBSET_OTHERS]
        members = [ref, tgt] + others
        used.update(dict.fromkeys(members))
        rows.append({"pairid": pairid, "reference": ref, "target_hard": tgt, "target_soft": {tgt: 1.0},
                     "caption": text[0], "caption_choices": text,
                     "img_set": {"id": pairid, "members": members, "reference_rank": 0, "target_rank": 1}})
    cap_path, split_path = files
    atomic_write_text(split_path, _dump({n: source[n] for n in used}))   # images first: captions point at them
    atomic_write_text(cap_path, _dump(rows))


def _write_fashioniq(opts: SPNOptions, g: _Group, texts: list[list[str]], files: tuple[Path, Path]) -> None:
    rows, used = [], {}
    for (i, j), text in zip(g.pairs, texts):
        ref, tgt = g.unique[i], g.unique[j]
        used.update(dict.fromkeys((ref, tgt)))
        rows.append({"target": tgt, "candidate": ref, "captions": [text[0], text[1 % len(text)]],
                     "caption_choices": text})
    cap_path, split_path = files
    atomic_write_text(split_path, _dump(list(used)))
    atomic_write_text(cap_path, _dump(rows))
