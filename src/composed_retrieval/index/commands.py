"""`cir index` (build/update a gallery index) and `cir search` (query it)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import ConfigError, DataError
from ..fileio import atomic_write_text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="embed a folder of images into a searchable index",
                       description="Embed every image under --gallery with a trained model. "
                                   "Rerunning an interrupted build resumes it; --add updates an "
                                   "existing index with new or changed images only.")
    p.add_argument("--gallery", help="folder of images (searched recursively); default with --add: the stored one")
    from ..train.models import add_model_options
    add_model_options(p, run_flag="--model", required=False,
                      run_help="run folder or checkpoint folder; default with --add: the stored model")
    p.add_argument("--out", required=True, help="index folder to write")
    p.add_argument("--kind", choices=("auto", "flat", "ivf", "hnsw", "ivfpq", "opq-ivfpq"), default=None,
                   help="FAISS engine: exact (flat), approximate (ivf, hnsw) or compressed (ivfpq, "
                        "opq-ivfpq); auto = flat below 50k images, else ivf, or the compressed kind "
                        "--max-memory asks for (default: auto, or the stored choice with --add)")
    p.add_argument("--max-memory", help="FAISS: RAM budget of the searched index, e.g. 4G; picks the "
                                        "engine and PQ code size that fit")
    p.add_argument("--pq-m", type=int, help="IVF-PQ: bytes per vector (must divide the dimension)")
    p.add_argument("--rerank", type=int, help="IVF-PQ: candidates re-scored exactly from the stored "
                                             "float16 vectors (default 100; 0 = off)")
    p.add_argument("--backend", choices=("faiss", "qdrant"), default="faiss",
                   help="faiss: files in --out (default); qdrant: vectors in a Qdrant collection, "
                        "--out keeps only index.json")
    p.add_argument("--qdrant", help="Qdrant: http(s)://host:port of a server/cluster, a folder "
                                    "(embedded local mode) or :memory:")
    p.add_argument("--collection", help="Qdrant: collection name")
    p.add_argument("--hnsw-m", type=int, help="Qdrant: HNSW links per node (default 16)")
    p.add_argument("--hnsw-ef-construct", type=int, help="Qdrant: HNSW build candidate list (default 100)")
    p.add_argument("--on-disk", action="store_true", default=None,
                   help="Qdrant: keep the original vectors on disk (memory-mapped)")
    p.add_argument("--qdrant-quantization", choices=("none", "int8", "binary", "pq"),
                   help="Qdrant: quantised copy kept in RAM for search, rescored with the originals")
    p.add_argument("--shards", type=int, help="Qdrant cluster: shards of the collection (default 1)")
    p.add_argument("--replicas", type=int, help="Qdrant cluster: copies of each shard (default 1)")
    p.add_argument("--add", action="store_true", help="update an existing index instead of building a new one")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=512,
                   help="images per resumable chunk written to disk while embedding")
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--nlist", type=int, help="IVF: number of lists (default ~4 sqrt(N))")
    p.add_argument("--nprobe", type=int, help="IVF: lists visited per query")
    p.add_argument("--ef-search", type=int, help="HNSW (FAISS or Qdrant): candidate list size per query")
    p.add_argument("--recall-target", type=float, default=0.95,
                   help="IVF without --nprobe / HNSW without --ef-search: the smallest nprobe / efSearch "
                        "reaching this recall@10 vs exact (default 0.95)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_index)

    s = sub.add_parser("search", help="search an index with a reference image and a modification text")
    s.add_argument("--index", required=True, help="index folder made by `cir index`")
    s.add_argument("--image", help="reference: an image file, or the name of a gallery image")
    s.add_argument("--text", help="modification text, e.g. \"make it red\"")
    s.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--queries", help="batch mode: JSONL of {\"image\": path or gallery name, \"text\": ...}")
    s.add_argument("--out", help="batch mode: JSONL file for the results")
    add_model_options(s, run_flag="--model", required=False,
                      run_help="use this run folder instead of the model stored in the index")
    s.add_argument("--gallery", help="gallery folder, if it moved since the index was built")
    s.add_argument("--nprobe", type=int, help="IVF: lists visited per query")
    s.add_argument("--ef-search", type=int, help="HNSW (FAISS or Qdrant): candidate list size per query")
    s.add_argument("--rerank", type=int, help="IVF-PQ: candidates re-scored exactly (0 = off)")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=run_search)


def _params(args: argparse.Namespace) -> dict[str, int]:
    out = {}
    for key in ("nlist", "nprobe", "ef_search", "pq_m", "rerank"):
        value = getattr(args, key, None)
        if value is not None:
            if value < (0 if key == "rerank" else 1):
                raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, got {value}")
            out["m" if key == "pq_m" else key] = value
    return out


def model_source(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The --model folder or --encoder spec, or None (use the model stored in the index)."""
    from ..train.models import source_from_args
    if args.run and args.method:
        raise ConfigError("--method goes with --encoder; a --model run folder brings its own method")
    return source_from_args(args)


def run_index(args: argparse.Namespace) -> int:
    from .build import build_index
    if not 0.0 < args.recall_target <= 1.0:
        raise ConfigError(f"--recall-target must be in (0, 1], got {args.recall_target}")
    for name in ("batch_size", "chunk_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    from .store import index_exists, read_meta
    stored = read_meta(args.out).get("backend", "faiss") if index_exists(args.out) else None
    if args.backend == "qdrant" or (args.add and stored == "qdrant"):
        return _run_qdrant_index(args)
    if stored == "qdrant":
        raise ConfigError(f"{args.out} holds a Qdrant index; pass --add (and --backend qdrant) to "
                          f"update it, or choose another --out")
    if args.qdrant or args.collection:
        raise ConfigError("--qdrant/--collection need --backend qdrant")
    from .faiss_index import parse_memory
    max_memory = parse_memory(args.max_memory) if args.max_memory else None
    from ..train import distributed
    # under torchrun each rank embeds a shard (on cuda:LOCAL_RANK with --device cuda); rank 0
    # may wait long for the slowest shard, hence the long barrier timeout
    ranks = distributed.setup(args.device, timeout_minutes=24 * 60)
    try:
        report = build_index(args.out, gallery=args.gallery, model=model_source(args), kind=args.kind, add=args.add,
                             batch_size=args.batch_size, chunk_size=args.chunk_size, device=str(ranks.device),
                             num_workers=args.num_workers, params=_params(args),
                             recall_target=args.recall_target, progress=not args.quiet and ranks.is_main,
                             max_memory=max_memory)
    finally:
        distributed.shutdown()
    if report.shard is not None:
        print(f"rank {report.shard}: {report.embedded} embedded, {report.reused} reused, "
              f"{len(report.skipped)} skipped, {report.seconds:.1f}s (rank 0 writes the index)")
        return 0
    _print_report(report)
    return 0


def _run_qdrant_index(args: argparse.Namespace) -> int:
    from .qdrant_index import build_qdrant_index
    if args.kind not in (None, "auto") or args.max_memory:
        raise ConfigError("--kind/--max-memory choose a FAISS engine; with --backend qdrant use the "
                          "collection settings (--hnsw-m, --on-disk, --qdrant-quantization, ...)")
    settings = {"hnsw_m": args.hnsw_m, "hnsw_ef_construct": args.hnsw_ef_construct, "hnsw_ef": args.ef_search,
                "on_disk": args.on_disk, "quantization": args.qdrant_quantization,
                "shards": args.shards, "replicas": args.replicas}
    from ..train.models import ModelSpec
    model = model_source(args)
    if isinstance(model, ModelSpec):
        raise ConfigError("--backend qdrant needs a --model run folder for now; index an --encoder spec "
                          "with the FAISS backend")
    report = build_qdrant_index(args.out, args.qdrant, args.collection, gallery=args.gallery, model=model,
                                add=args.add, settings=settings, batch_size=args.batch_size,
                                chunk_size=args.chunk_size, device=args.device, num_workers=args.num_workers,
                                progress=not args.quiet)
    _print_report(report)
    return 0


def _print_report(report) -> None:
    for name, error in report.skipped:
        print(f"skipped {name}: {error}")
    for name in report.removed:
        print(f"removed {name} (no longer in the gallery)")
    recall = f", recall@10 vs exact {report.recall_at_10:.4f}" if report.recall_at_10 is not None else ""
    print(f"index {report.folder}: {report.count} images ({report.embedded} embedded, {report.reused} reused, "
          f"{len(report.changed)} changed, {len(report.skipped)} skipped, {len(report.removed)} removed), "
          f"{report.kind} engine{recall}, {report.seconds:.1f}s")


def run_search(args: argparse.Namespace) -> int:
    from .search import Searcher
    if args.k < 1:
        raise ConfigError(f"-k must be at least 1, got {args.k}")
    batch = args.queries is not None
    if batch and (args.image or args.text):
        raise ConfigError("use either --queries (batch) or --image/--text (one query), not both")
    if batch and not args.out:
        raise ConfigError("--queries needs --out RESULTS.jsonl")
    if not batch and (not args.image or args.text is None):
        raise ConfigError("give --image and --text (or --queries FILE.jsonl --out RESULTS.jsonl)")
    searcher = Searcher.open(args.index, model=model_source(args), gallery=args.gallery, device=args.device,
                             search_params=_params(args))
    if batch:
        return _run_batch(searcher, Path(args.queries), Path(args.out), args.k)
    hits = searcher.search(searcher.reference(args.image), args.text, args.k)
    if args.json:
        json.dump({"image": args.image, "text": args.text, "results": [h.as_dict() for h in hits]},
                  sys.stdout, indent=2)
        print()
    else:
        width = max([len(h.name) for h in hits] + [4])
        print(f"{'rank':>4}  {'score':>7}  name")
        for h in hits:
            print(f"{h.rank:>4}  {h.score:7.4f}  {h.name:<{width}}".rstrip())
    return 0


QUERY_KEYS = ("image", "text")


def _read_queries(queries: Path) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """(line number, query) of every well-formed line and (line number, reason) of the others:
    one bad line must not cost the answers of all the good ones."""
    from ..fileio import parse_json, read_text

    good, bad = [], []
    for lineno, line in enumerate(read_text(queries, "query JSONL file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = parse_json(line)
        except ValueError as exc:
            bad.append((lineno, f"malformed JSON ({str(exc).split(' at line ')[0]})"))
            continue
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("text"), str):
            bad.append((lineno, "must be an object with string fields 'image' and 'text'"))
        elif set(row) - set(QUERY_KEYS):
            bad.append((lineno, f"unknown key {sorted(set(row) - set(QUERY_KEYS))[0]!r} "
                                f"(expected keys: {', '.join(QUERY_KEYS)})"))
        elif not row["text"].strip():
            bad.append((lineno, "empty 'text'"))
        else:
            good.append((lineno, row))
    return good, bad


def _run_batch(searcher, queries: Path, out: Path, k: int, batch_size: int = 32) -> int:
    """Answer every good line (each result names its ``line``), list the bad ones; exit 2 only
    when no line could be answered."""
    good, bad = _read_queries(queries)
    answerable = []
    for lineno, row in good:
        try:
            answerable.append((lineno, row, searcher.reference(row["image"])))
        except DataError as exc:
            bad.append((lineno, str(exc)))
    lines = []
    for lo in range(0, len(answerable), batch_size):
        chunk = answerable[lo:lo + batch_size]
        try:
            answers = searcher.search_many([r for _, _, r in chunk], [row["text"] for _, row, _ in chunk], k)
        except DataError:   # one bad text in the chunk: answer its lines one by one
            answers = []
            for lineno, row, ref in chunk:
                try:
                    answers.append(searcher.search(ref, row["text"], k))
                except DataError as exc:
                    bad.append((lineno, str(exc)))
                    answers.append(None)
        for (lineno, row, _), hits in zip(chunk, answers):
            if hits is not None:
                lines.append(json.dumps({"line": lineno, "image": row["image"], "text": row["text"],
                                         "results": [h.as_dict() for h in hits]}))
    bad.sort()
    for lineno, reason in bad:
        print(f"skipped line {lineno}: {reason}")
    if not lines:
        raise DataError(f"no query could be answered ({len(bad)} bad lines; first: line {bad[0][0]}: "
                        f"{bad[0][1]})" if bad else "no queries in the file", queries)
    atomic_write_text(out, "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} results to {out}" + (f" ({len(bad)} lines skipped, listed above)" if bad else ""))
    return 0
