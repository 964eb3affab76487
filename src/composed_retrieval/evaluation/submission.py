"""Prediction and submission files: build, validate, write, read.

The formats are the CIRR and CIRCO evaluation servers', as CLIP4Cir and SEARLE write them.

CIRR (server format, two files): {"version": "rc2", "metric": "recall", "<pairid>": [50 names]}
and the same with "recall_subset" and 3 names. CIRCO: {"<query id>": [50 unique int ids]}.
FashionIQ (local scoring only): {"<category>/<index>": [50 names]}.

Lists must hold exactly min(K, rankable images) entries (K = 50, subset 3): the servers expect
exactly 50 / 3, and small galleries (tests, user data) cannot fill 50.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.base import CIRSplit
from ..errors import CIRError, DataError
from ..fileio import atomic_write_json, read_json
from .protocols import REMOVES_REFERENCE, SUBSET_TOP, Rankings, _subset_members, circo_int, protocol_of

TOP = 50
CIRR_VERSION = "rc2"
CIRR_METRICS = ("recall", "recall_subset")
MAX_SHOWN = 5   # problems quoted in a one-line error


def _ranked_length(split: CIRSplit) -> int:
    n = len(split.gallery)
    if not n:
        return TOP
    removes = REMOVES_REFERENCE.get(protocol_of(split), True)
    return min(TOP, n - 1 if removes else n)


# ----------------------------------------------------------------------------- building

def cirr_submission(rankings: Rankings) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two CIRR server files (recall top-50, recall_subset top-3)."""
    if rankings.subset_names is None:
        raise CIRError("CIRR submission needs subset rankings (Rankings.subset_names)")
    recall: dict[str, Any] = {"version": CIRR_VERSION, "metric": "recall"}
    subset: dict[str, Any] = {"version": CIRR_VERSION, "metric": "recall_subset"}
    for qid, names, sub in zip(rankings.query_ids, rankings.names, rankings.subset_names):
        recall[str(qid)] = list(names[:TOP])
        subset[str(qid)] = list(sub[:SUBSET_TOP])
    return recall, subset


def circo_submission(rankings: Rankings) -> dict[str, list[int]]:
    """{"<query id>": [top-50 COCO ids as ints]}."""
    return {str(qid): [circo_int(n) for n in names[:TOP]] for qid, names in zip(rankings.query_ids, rankings.names)}


def fashioniq_predictions(rankings_per_category: Mapping[str, Rankings]) -> dict[str, list[str]]:
    """{"<category>/<index>": [top-50 names]} over all given categories."""
    out: dict[str, list[str]] = {}
    for cat, rk in rankings_per_category.items():
        for qid, names in zip(rk.query_ids, rk.names):
            key = str(qid) if "/" in str(qid) else f"{cat}/{qid}"
            if key in out:
                raise CIRError(f"FashionIQ query id {key} appears in more than one category")
            out[key] = list(names[:TOP])
    return out


# ----------------------------------------------------------------------------- validation

def _check_keys(obj: Mapping[str, Any], expected: Sequence[str], problems: list[str], what: str) -> None:
    exp = set(expected)
    missing = [qid for qid in expected if qid not in obj]
    extra = sorted(k for k in obj if k not in exp)
    if missing:
        problems.append(f"{what}: {len(missing)} query id(s) missing (first: {', '.join(missing[:MAX_SHOWN])})")
    if extra:
        problems.append(f"{what}: {len(extra)} key(s) that are not query ids (first: {', '.join(map(str, extra[:MAX_SHOWN]))})")


def _check_list(qid: str, value: Any, length: int, item_type: type, what: str, problems: list[str]) -> list | None:
    """Common checks of one ranked list; returns it when its items have the right type."""
    if not isinstance(value, list):
        problems.append(f"{what} query {qid}: expected a list, got {type(value).__name__}")
        return None
    bad = [v for v in value if not isinstance(v, item_type) or isinstance(v, bool)]
    if bad:
        problems.append(f"{what} query {qid}: entries must be {item_type.__name__}s, found {bad[0]!r}")
        return None
    if len(value) != length:
        problems.append(f"{what} query {qid}: expected {length} entries, got {len(value)}")
    dupes = sorted((v for v, c in Counter(value).items() if c > 1), key=str)
    if dupes:
        problems.append(f"{what} query {qid}: duplicate entries {', '.join(map(str, dupes[:MAX_SHOWN]))}")
    return value


def _check_header(obj: Any, metric: str, problems: list[str], what: str) -> bool:
    if not isinstance(obj, Mapping):
        problems.append(f"{what}: expected a JSON object, got {type(obj).__name__}")
        return False
    if obj.get("version") != CIRR_VERSION:
        problems.append(f"{what}: \"version\" must be {CIRR_VERSION!r}, got {obj.get('version')!r}")
    if obj.get("metric") != metric:
        problems.append(f"{what}: \"metric\" must be {metric!r}, got {obj.get('metric')!r}")
    return True


def validate_cirr_submission(split: CIRSplit, recall_obj: Any, subset_obj: Any) -> list[str]:
    """Every problem with a pair of CIRR files, one human-readable line each (empty: valid)."""
    problems: list[str] = []
    ids = [str(q["query_id"]) for q in split.queries]
    gallery = set(split.gallery)
    length = _ranked_length(split)
    by_id = {str(q["query_id"]): q for q in split.queries}

    if _check_header(recall_obj, "recall", problems, "recall"):
        body = {k: v for k, v in recall_obj.items() if k not in ("version", "metric")}
        _check_keys(body, ids, problems, "recall")
        for qid, value in body.items():
            lst = _check_list(qid, value, length, str, "recall", problems)
            if lst is None or qid not in by_id:
                continue
            unknown = [n for n in lst if n not in gallery]
            if unknown and gallery:
                problems.append(f"recall query {qid}: {len(unknown)} name(s) not in the {split.split} gallery "
                                f"(first: {', '.join(unknown[:MAX_SHOWN])})")
            if by_id[qid]["reference"] in lst:
                problems.append(f"recall query {qid}: lists its reference image {by_id[qid]['reference']} "
                                f"(the CIRR protocol removes it)")

    if _check_header(subset_obj, "recall_subset", problems, "recall_subset"):
        body = {k: v for k, v in subset_obj.items() if k not in ("version", "metric")}
        _check_keys(body, ids, problems, "recall_subset")
        for qid, value in body.items():
            q = by_id.get(qid)
            members = _subset_members(q) if q is not None else []
            lst = _check_list(qid, value, min(SUBSET_TOP, len(members)) if q is not None else SUBSET_TOP,
                              str, "recall_subset", problems)
            if lst is None or q is None:
                continue
            outside = [n for n in lst if n not in members]
            if outside:
                problems.append(f"recall_subset query {qid}: {', '.join(outside[:MAX_SHOWN])} not in its img_set "
                                f"(members other than the reference)")
    return problems


def validate_circo_submission(split: CIRSplit, obj: Any) -> list[str]:
    """Every problem with a CIRCO file, one human-readable line each (empty: valid)."""
    problems: list[str] = []
    if not isinstance(obj, Mapping):
        return [f"expected a JSON object, got {type(obj).__name__}"]
    ids = [str(q["query_id"]) for q in split.queries]
    _check_keys(obj, ids, problems, "circo")
    gallery_ids = {circo_int(n) for n in split.gallery}
    length = _ranked_length(split)
    for qid, value in obj.items():
        lst = _check_list(str(qid), value, length, int, "circo", problems)
        if lst is None or not gallery_ids:
            continue
        unknown = [v for v in lst if v not in gallery_ids]
        if unknown:
            problems.append(f"circo query {qid}: {len(unknown)} id(s) not in the gallery "
                            f"(first: {', '.join(map(str, unknown[:MAX_SHOWN]))})")
    return problems


def validate_fashioniq_predictions(splits: Sequence[CIRSplit], obj: Any) -> list[str]:
    """Every problem with a FashionIQ prediction file covering the given category splits."""
    if not isinstance(obj, Mapping):
        return [f"expected a JSON object, got {type(obj).__name__}"]
    problems: list[str] = []
    ids: list[str] = []
    owner: dict[str, CIRSplit] = {}
    for sp in splits:
        for q in sp.queries:
            ids.append(str(q["query_id"]))
            owner[str(q["query_id"])] = sp
    _check_keys(obj, ids, problems, "fashioniq")
    galleries = {id(sp): set(sp.gallery) for sp in splits}
    for qid, value in obj.items():
        sp = owner.get(qid)
        length = _ranked_length(sp) if sp is not None else TOP
        lst = _check_list(qid, value, length, str, "fashioniq", problems)
        if lst is None or sp is None:
            continue
        unknown = [n for n in lst if n not in galleries[id(sp)]]
        if unknown:
            problems.append(f"fashioniq query {qid}: {len(unknown)} name(s) not in the {sp.category} {sp.split} "
                            f"gallery (first: {', '.join(unknown[:MAX_SHOWN])})")
    return problems


def problems_error(problems: list[str], what: str, path: str | Path | None = None) -> DataError:
    """One-line error summarising a validator's problems."""
    shown = "; ".join(problems[:3])
    more = f" (and {len(problems) - 3} more; run `cir validate-submission` for all)" if len(problems) > 3 else ""
    return DataError(f"invalid {what}: {len(problems)} problem(s): {shown}{more}", path)


# ----------------------------------------------------------------------------- writing

def write_cirr_submission(out_dir: str | Path, split: CIRSplit, rankings: Rankings, stem: str = "cirr") -> tuple[Path, Path]:
    """Validate, then write ``<stem>_recall.json`` and ``<stem>_recall_subset.json`` atomically."""
    recall, subset = cirr_submission(rankings)
    problems = validate_cirr_submission(split, recall, subset)
    if problems:
        raise problems_error(problems, "CIRR submission (not written)", out_dir)
    out_dir = Path(out_dir)
    return (atomic_write_json(out_dir / f"{stem}_recall.json", recall),
            atomic_write_json(out_dir / f"{stem}_recall_subset.json", subset))


def write_circo_submission(path: str | Path, split: CIRSplit, rankings: Rankings) -> Path:
    """Validate, then write the CIRCO file atomically."""
    obj = circo_submission(rankings)
    problems = validate_circo_submission(split, obj)
    if problems:
        raise problems_error(problems, "CIRCO submission (not written)", path)
    return atomic_write_json(path, obj)


def write_fashioniq_predictions(path: str | Path, splits: Sequence[CIRSplit],
                                rankings_per_category: Mapping[str, Rankings]) -> Path:
    obj = fashioniq_predictions(rankings_per_category)
    problems = validate_fashioniq_predictions(splits, obj)
    if problems:
        raise problems_error(problems, "FashionIQ predictions (not written)", path)
    return atomic_write_json(path, obj)


# ----------------------------------------------------------------------------- reading

@dataclass
class Predictions:
    """A prediction file as read: the ranked lists, and CIRR's subset lists when given."""

    dataset: str
    ranked: dict[str, list]                  # query id -> names (CIRCO: int ids)
    subset: dict[str, list[str]] | None = None
    raw: Any = None                          # the object(s) as read, for the validators
    raw_subset: Any = None
    path: Path | None = None

    def to_rankings(self) -> Rankings:
        ids = list(self.ranked)
        names = [[str(n) for n in self.ranked[q]] for q in ids]
        subset = None
        if self.subset is not None:
            subset = [list(self.subset.get(q, [])) for q in ids]
        return Rankings(ids, names, subset)


def _read_object(path: str | Path, what: str) -> dict[str, Any]:
    obj = read_json(path, what)
    if not isinstance(obj, dict):
        raise DataError(f"{what} must be a JSON object keyed by query id, got {type(obj).__name__}", path)
    return obj


def _typed_lists(obj: Mapping[str, Any], item_type: type, path: str | Path, what: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for key, value in obj.items():
        if not isinstance(value, list):
            raise DataError(f"{what}: query {key}: expected a list, got {type(value).__name__}", path)
        for v in value:
            if not isinstance(v, item_type) or isinstance(v, bool):
                raise DataError(f"{what}: query {key}: entries must be {item_type.__name__}s, found {v!r}", path)
        out[str(key)] = value
    return out


def read_predictions(dataset: str, path: str | Path, subset_path: str | Path | None = None) -> Predictions:
    """Read a prediction file in the format ``cir predict`` writes (the CIRR and CIRCO submission
    formats; FashionIQ ``{"<category>/<index>": [top-50 names]}``), with one-line errors on bad shapes.

    CIRR: ``path`` and ``subset_path`` are the recall and recall_subset files, in either order
    (recognised by their "metric" key). Content checks against a split are the validators' job.
    """
    if dataset == "cirr":
        objs = {}
        for p in [path] + ([subset_path] if subset_path is not None else []):
            obj = _read_object(p, "CIRR prediction file")
            metric = obj.get("metric")
            if metric not in CIRR_METRICS:
                raise DataError(f"CIRR prediction file needs \"metric\": \"recall\" or \"recall_subset\", got {metric!r}", p)
            if obj.get("version") != CIRR_VERSION:
                raise DataError(f"CIRR prediction file needs \"version\": {CIRR_VERSION!r}, got {obj.get('version')!r}", p)
            if metric in objs:
                raise DataError(f"two CIRR prediction files both have \"metric\": {metric!r}", p)
            body = {k: v for k, v in obj.items() if k not in ("version", "metric")}
            objs[metric] = (p, obj, _typed_lists(body, str, p, f"CIRR {metric} file"))
        if "recall" not in objs:
            raise DataError("no CIRR file with \"metric\": \"recall\" was given", path)
        p, raw, ranked = objs["recall"]
        sub = objs.get("recall_subset")
        return Predictions("cirr", ranked, sub[2] if sub else None, raw, sub[1] if sub else None, Path(p))
    if dataset == "circo":
        obj = _read_object(path, "CIRCO prediction file")
        return Predictions("circo", _typed_lists(obj, int, path, "CIRCO prediction file"), raw=obj, path=Path(path))
    if dataset == "fashioniq":
        obj = _read_object(path, "FashionIQ prediction file")
        return Predictions("fashioniq", _typed_lists(obj, str, path, "FashionIQ prediction file"), raw=obj, path=Path(path))
    raise DataError(f"unknown dataset {dataset!r} for prediction files; expected cirr, fashioniq or circo")
