"""What every index backend returns and records: ranked hits, what a query leaves out, and
the model fingerprint kept with the vectors (shared by the FAISS and Qdrant backends, below
both so that neither imports the other)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: what a query leaves out: the reference's gallery name and/or content hash
Exclusion = tuple[str | None, str | None]


@dataclass
class Hit:
    rank: int
    name: str
    score: float

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "name": self.name, "score": round(self.score, 6)}


def model_fingerprint(model: str | Path) -> str | None:
    """The weights hash a checkpoint records, if any (to notice a retrained model later)."""
    try:
        from ..train.checkpoint import read_checkpoint_meta, resolve_checkpoint, weights_fingerprint
        return weights_fingerprint(read_checkpoint_meta(resolve_checkpoint(model)))
    except Exception:  # no checkpoint module or no hash: nothing to compare against
        return None


def stored_model(data: Any) -> Any:
    """The model an index was built with: its run folder (a Path) or its ModelSpec."""
    if data.meta.get("model_spec"):
        from ..train.models import ModelSpec
        return ModelSpec.from_json(data.meta["model_spec"])
    return data.model_path()


def model_key(model: Any) -> str:
    """A comparable name for a model source: a resolved folder path, or the spec as JSON."""
    import json

    from ..train.models import parse_source
    parsed = parse_source(model)
    if isinstance(parsed, Path):
        return str(parsed.resolve())
    return json.dumps(parsed.to_json(), sort_keys=True)
