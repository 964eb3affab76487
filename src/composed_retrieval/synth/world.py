"""The synthetic world: scenes of coloured shapes on a 3x3 grid, edits, texts and split plans.

Everything here is symbolic (no pixels), so plans are cheap, exactly checkable in tests and
identical for every output format. Rendering lives in ``render.py``, files in ``writer.py``.
Randomness comes from one numpy Generator per split, derived from the seed by a fixed spawn
key, so a split's plan never depends on how many other splits were generated before it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")
SIZES = ("small", "large")
#: the nouns of the captions (every object phrase's head noun), handed to the noun finder
NOUNS = SHAPES
#: grid cells in reading order: cell = 3 * row + col
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
_PREPOSITION = ("at the", "at the", "at the", "on the", "in the", "on the", "at the", "at the", "at the")
MAX_OBJECTS = 5

#: split name -> (image name prefix, spawn key index); val uses CIRR's "dev" prefix and folder
SPLITS = {"train": ("train", 0), "val": ("dev", 1), "test1": ("test1", 2), "heldout": ("heldout", 3)}


@dataclass(frozen=True, order=True)
class Obj:
    cell: int
    shape: str
    color: str
    size: str

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "size": self.size,
                "row": self.cell // 3, "col": self.cell % 3, "position": POSITIONS[self.cell]}


Scene = tuple[Obj, ...]   # sorted by cell, at most one object per cell
Step = dict[str, Any]     # one edit: {"op": "add"|"remove"|"color"|"size"|"shape", "cell": int, ...}


def make_scene(objs: Iterable[Obj]) -> Scene:
    scene = tuple(sorted(objs))
    cells = [o.cell for o in scene]
    if len(set(cells)) != len(cells):
        raise ValueError(f"two objects share a cell: {cells}")
    return scene


def scene_key(scene: Scene) -> str:
    """Canonical identity of a scene: equal keys = the same scene (one gallery image per key)."""
    return "|".join(f"{o.cell}:{o.size}:{o.color}:{o.shape}" for o in scene)


def scene_from_dicts(objects: list[dict[str, Any]]) -> Scene:
    return make_scene(Obj(3 * int(o["row"]) + int(o["col"]), o["shape"], o["color"], o["size"])
                      for o in objects)


def _at(cell: int) -> str:
    return f"{_PREPOSITION[cell]} {POSITIONS[cell]}"


def object_phrase(o: Obj) -> str:
    return f"a {o.size} {o.color} {o.shape} {_at(o.cell)}"


def caption(scene: Scene) -> str:
    """Deterministic scene caption in reading order: 'a large red circle at the top left and ...'."""
    parts = [object_phrase(o) for o in scene]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def short_caption(scene: Scene) -> str:
    """Colour and shape of each object, no size or position ('red circle, blue square and green
    triangle'): 2-10 words, like SPN's 8-word LLaVA captions, so that two of them fit SPN's
    templates in a short text tower; the full caption would not (see ``caption``)."""
    parts = [f"{o.color} {o.shape}" for o in scene]
    if not parts:
        return "empty scene"
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(scene: Scene) -> dict[str, Any]:
    return {"objects": [o.to_dict() for o in scene], "caption": caption(scene)}


def combos(scene: Scene) -> set[tuple[str, str]]:
    return {(o.shape, o.color) for o in scene}


# ---------------------------------------------------------------- edits

def _obj_at(scene: Scene, cell: int) -> Obj:
    for o in scene:
        if o.cell == cell:
            return o
    raise ValueError(f"no object in cell {cell}")


def apply_step(scene: Scene, step: Step) -> Scene:
    op, cell = step["op"], step["cell"]
    if op == "add":
        if any(o.cell == cell for o in scene):
            raise ValueError(f"cell {cell} is occupied")
        return make_scene(scene + (Obj(cell, step["shape"], step["color"], step["size"]),))
    old = _obj_at(scene, cell)
    rest = tuple(o for o in scene if o.cell != cell)
    if op == "remove":
        return make_scene(rest)
    if op in ("color", "size", "shape"):
        attrs = {"shape": old.shape, "color": old.color, "size": old.size, op: step["value"]}
        return make_scene(rest + (Obj(cell, attrs["shape"], attrs["color"], attrs["size"]),))
    raise ValueError(f"unknown edit op {op!r}")


def apply_edit(scene: Scene, steps: list[Step]) -> Scene:
    for step in steps:
        scene = apply_step(scene, step)
    return scene


def edit_kind(steps: list[Step]) -> str:
    return steps[0]["op"] if len(steps) == 1 else "two-step"


# ---------------------------------------------------------------- texts

def referring_expressions(scene: Scene, o: Obj) -> list[str]:
    """Phrases that pick out ``o`` uniquely in ``scene`` (so the target is determined)."""
    out = [f"{o.color} {o.shape} {_at(o.cell)}", f"{o.size} {o.color} {o.shape} {_at(o.cell)}",
           f"{o.shape} {_at(o.cell)}"]
    if sum(p.color == o.color and p.shape == o.shape for p in scene) == 1:
        out.append(f"{o.color} {o.shape}")
    if sum(p.color == o.color and p.shape == o.shape and p.size == o.size for p in scene) == 1:
        out.append(f"{o.size} {o.color} {o.shape}")
    if sum(p.shape == o.shape for p in scene) == 1:
        out.append(f"{o.shape}")
    return out


_TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": ("add a {size} {color} {shape} {at}", "put a {size} {color} {shape} {at}",
            "place a {size} {color} {shape} {at}", "there should also be a {size} {color} {shape} {at}"),
    "remove": ("remove the {ref}", "delete the {ref}", "take away the {ref}", "get rid of the {ref}"),
    "color": ("make the {ref} {value}", "change the {ref} to {value}", "paint the {ref} {value}",
              "the {ref} should be {value}"),
    "size": ("make the {ref} {value}", "make the {ref} {comparative}", "change the {ref} to a {value} one",
             "the {ref} should be {value}"),
    "shape": ("make the {ref} a {value}", "turn the {ref} into a {value}", "change the {ref} into a {value}",
              "replace the {ref} with a {size} {color} {value}"),
}
_JOINS = ("{a} and {b}", "{a}, then {b}", "{a} and also {b}")


def step_text(scene: Scene, step: Step, rng: np.random.Generator) -> str:
    op, cell = step["op"], step["cell"]
    template = _TEMPLATES[op][int(rng.integers(len(_TEMPLATES[op])))]
    if op == "add":
        return template.format(size=step["size"], color=step["color"], shape=step["shape"], at=_at(cell))
    o = _obj_at(scene, cell)
    refs = referring_expressions(scene, o)
    ref = refs[int(rng.integers(len(refs)))]
    value = step.get("value", "")
    comparative = "bigger" if value == "large" else "smaller"
    return template.format(ref=ref, value=value, comparative=comparative, size=o.size, color=o.color)


def edit_text(scene: Scene, steps: list[Step], rng: np.random.Generator) -> str:
    """Modification text; each step is phrased against the scene as it is at that step."""
    texts = []
    for step in steps:
        texts.append(step_text(scene, step, rng))
        scene = apply_step(scene, step)
    if len(texts) == 1:
        return texts[0]
    return _JOINS[int(rng.integers(len(_JOINS)))].format(a=texts[0], b=texts[1])


# ---------------------------------------------------------------- sampling

_KINDS = ("add", "remove", "color", "size", "shape", "two-step")
_KIND_P = np.array([0.18, 0.16, 0.2, 0.14, 0.16, 0.16])


def _pick(rng: np.random.Generator, seq: tuple | list) -> Any:
    return seq[int(rng.integers(len(seq)))]


def sample_object(rng: np.random.Generator, cell: int, forbidden: frozenset) -> Obj:
    while True:
        o = Obj(cell, _pick(rng, SHAPES), _pick(rng, COLORS), _pick(rng, SIZES))
        if (o.shape, o.color) not in forbidden:
            return o


def sample_scene(rng: np.random.Generator, forbidden: frozenset) -> Scene:
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = sorted(int(c) for c in rng.choice(9, size=n, replace=False))
    return make_scene(sample_object(rng, c, forbidden) for c in cells)


def sample_step(scene: Scene, op: str, rng: np.random.Generator, avoid_cells: set[int]) -> Step | None:
    free = [c for c in range(9) if c not in {o.cell for o in scene} and c not in avoid_cells]
    objs = [o for o in scene if o.cell not in avoid_cells]
    if op == "add":
        if len(scene) >= MAX_OBJECTS or not free:
            return None
        o = sample_object(rng, _pick(rng, free), frozenset())
        return {"op": "add", "cell": o.cell, "shape": o.shape, "color": o.color, "size": o.size}
    if not objs or (op == "remove" and len(scene) <= 1):
        return None
    o = _pick(rng, objs)
    if op == "remove":
        return {"op": "remove", "cell": o.cell}
    values = {"color": COLORS, "size": SIZES, "shape": SHAPES}[op]
    current = getattr(o, op)
    return {"op": op, "cell": o.cell, "value": _pick(rng, [v for v in values if v != current])}


def sample_edit(scene: Scene, rng: np.random.Generator) -> list[Step] | None:
    kind = _KINDS[int(rng.choice(len(_KINDS), p=_KIND_P))]
    if kind != "two-step":
        step = sample_step(scene, kind, rng, set())
        return None if step is None else [step]
    first = sample_step(scene, _pick(rng, _KINDS[:5]), rng, set())
    if first is None:
        return None
    mid = apply_step(scene, first)
    second = sample_step(mid, _pick(rng, _KINDS[:5]), rng, {first["cell"]})  # never undo step one
    return None if second is None else [first, second]


# ---------------------------------------------------------------- split plans

@dataclass(frozen=True)
class SizeSpec:
    groups: dict[str, int]      # img_set groups per split
    queries_per_group: int      # triplets per group (targets among the 5 variants)
    image_size: int             # rendered side in pixels


SIZES_SPEC = {
    "tiny": SizeSpec({"train": 25, "val": 8, "test1": 6, "heldout": 6}, 3, 64),
    "small": SizeSpec({"train": 2400, "val": 340, "test1": 170, "heldout": 170}, 3, 64),
    "medium": SizeSpec({"train": 9600, "val": 1360, "test1": 680, "heldout": 680}, 3, 64),
}
SET_SIZE = 6  # CIRR img_set: the reference plus 5 near-identical scenes


@dataclass
class Triplet:
    pairid: int
    reference: str
    target: str
    steps: list[Step]
    captions: list[str]          # two paraphrases of the same edit (CIRR uses the first)
    group: int

    @property
    def kind(self) -> str:
        return edit_kind(self.steps)


@dataclass
class SplitPlan:
    name: str
    prefix: str
    scenes: dict[str, Scene] = field(default_factory=dict)      # image name -> scene, gallery order
    keys: dict[str, str] = field(default_factory=dict)          # scene key -> image name
    groups: list[list[str]] = field(default_factory=list)       # img_set members per group id
    triplets: list[Triplet] = field(default_factory=list)

    def name_for(self, scene: Scene, proposal: str) -> str:
        """One image per distinct scene: reuse the name of an identical scene rendered before."""
        key = scene_key(scene)
        if key not in self.keys:
            self.keys[key] = proposal
            self.scenes[proposal] = scene
        return self.keys[key]


@dataclass
class Plan:
    seed: int
    size: str
    spec: SizeSpec
    heldout_combos: list[tuple[str, str]]
    splits: dict[str, SplitPlan]


def choose_heldout_combos(seed: int) -> list[tuple[str, str]]:
    """One (shape, colour) pair per shape, distinct colours, drawn from the seed."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(99,)))
    colors = rng.permutation(len(COLORS))[: len(SHAPES)]
    return [(s, COLORS[int(c)]) for s, c in zip(SHAPES, colors)]


def _two_captions(scene: Scene, steps: list[Step], rng: np.random.Generator) -> list[str]:
    first = edit_text(scene, steps, rng)
    second = first
    for _ in range(8):  # a different paraphrase when one exists
        second = edit_text(scene, steps, rng)
        if second != first:
            break
    return [first, second]


def _image_name(prefix: str, group: int, member: int) -> str:
    """CIRR-like names ("dev-244-0-img0"), unique across splits through the prefix."""
    return f"{prefix}-{group}-{member // 2}-img{member % 2}"


def plan_split(name: str, seed: int, spec: SizeSpec, heldout: list[tuple[str, str]],
               first_pairid: int) -> SplitPlan:
    prefix, index = SPLITS[name]
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, 0)))
    forbidden = frozenset(heldout)
    is_heldout = name == "heldout"
    plan = SplitPlan(name, prefix)
    pairid = first_pairid
    g = 0
    while len(plan.groups) < spec.groups[name]:
        base = sample_scene(rng, forbidden)
        keys = {scene_key(base)}
        variants: list[tuple[Scene, list[Step]]] = []
        for _ in range(2000):
            if len(variants) == SET_SIZE - 1:
                break
            steps = sample_edit(base, rng)
            if steps is None:
                continue
            scene = apply_edit(base, steps)
            if scene_key(scene) in keys:
                continue
            is_target = len(variants) < spec.queries_per_group
            has_heldout = bool(combos(scene) & forbidden)
            if is_heldout and is_target and not has_heldout:
                continue  # every held-out target shows a combination never seen in training
            if not is_heldout and has_heldout:
                continue  # in-distribution splits never show a held-out combination
            keys.add(scene_key(scene))
            variants.append((scene, steps))
        if len(variants) < SET_SIZE - 1:
            continue  # a base with too few distinct edits (rare); draw another
        ref = plan.name_for(base, _image_name(prefix, g, 0))
        names = [plan.name_for(s, _image_name(prefix, g, m + 1)) for m, (s, _) in enumerate(variants)]
        members = [ref] + names
        order = rng.permutation(SET_SIZE)
        plan.groups.append([members[int(i)] for i in order])
        for (scene, steps), target in zip(variants[: spec.queries_per_group], names):
            plan.triplets.append(Triplet(pairid, ref, target, steps, _two_captions(base, steps, rng), g))
            pairid += 1
        g += 1
    return plan


def make_plan(seed: int, size: str) -> Plan:
    if size not in SIZES_SPEC:
        raise ValueError(f"unknown size {size!r}")
    spec = SIZES_SPEC[size]
    heldout = choose_heldout_combos(seed)
    splits: dict[str, SplitPlan] = {}
    pairid = 0
    for name in SPLITS:
        splits[name] = plan_split(name, seed, spec, heldout, pairid)
        pairid += len(splits[name].triplets)
    return Plan(seed, size, spec, heldout, splits)
