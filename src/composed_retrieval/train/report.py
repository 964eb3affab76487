"""A self-contained HTML report: metrics, training curves and example queries with their top-5."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from ..data.base import CIRSplit
from ..data.images import load_image
from ..fileio import atomic_write_text


def _thumb(path: Path, size: int = 96) -> str:
    im = load_image(path)
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_report(path: Path, title: str, split: CIRSplit, top: list[list[str]], metrics: dict[str, Any],
                 curves: Path | None, n_queries: int = 20) -> Path:
    """``top[i]`` is the ranked gallery names for ``split.queries[i]``."""
    rows = []
    for q, names in list(zip(split.queries, top))[:n_queries]:
        cells = []
        for rank, name in enumerate(names[:5], 1):
            hit = name == q.get("target")
            cells.append(f'<td class="{"hit" if hit else ""}"><img src="{_thumb(split.image_path(name))}">'
                         f'<div>{rank}{" ✓ target" if hit else ""}</div></td>')
        target = q.get("target")
        target_cell = (f'<td class="tgt"><img src="{_thumb(split.image_path(target))}"><div>target</div></td>'
                       if target else "<td></td>")
        rows.append(f'<tr><td><img src="{_thumb(split.image_path(q["reference"]))}"><div>reference</div></td>'
                    f'<td class="cap">{html.escape(q["caption"])}</td>{target_cell}{"".join(cells)}</tr>')
    curves_html = ""
    if curves is not None and curves.is_file():
        curves_html = f'<h2>Training curves</h2><img src="data:image/png;base64,{base64.b64encode(curves.read_bytes()).decode()}">'
    metric_rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{v:.2f}</td></tr>" for k, v in metrics.items()
                          if isinstance(v, (int, float)))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse}}
td{{padding:4px;text-align:center;vertical-align:middle;font-size:12px}} td.cap{{max-width:260px;text-align:left;font-size:14px}}
td.hit{{background:#c8f7c5;outline:3px solid #2a2}} td.tgt{{background:#eef}} .m td{{text-align:left;border-bottom:1px solid #ddd}}</style>
</head><body><h1>{html.escape(title)}</h1>
<h2>Validation metrics (%)</h2><table class="m">{metric_rows}</table>{curves_html}
<h2>{min(n_queries, len(split.queries))} validation queries: reference, modification, target, top-5 (target marked green)</h2>
<table>{"".join(rows)}</table></body></html>"""
    return atomic_write_text(path, page)


def metrics_json(metrics: dict[str, Any]) -> str:
    return json.dumps(metrics, indent=2)
