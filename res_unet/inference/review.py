"""The review page: one self-contained HTML file listing every scene of a segmentation folder.

``review.html`` (``review_shard{i}of{n}.html`` for a shard) opens from disk on an offline
laptop: no server, no network, no CDN (a Content-Security-Policy allows nothing but the
folder's own files and the page's own script and style). It lists every scene with small
pictures (the image, the prediction overlay and, where labels were given, the label overlay),
its uncertainty figures and scores, sortable by uncertainty, score or name; clicking a scene
shows it large with toggles between image / prediction / label / uncertainty, and links to its
full-size outputs (never embedded).

Pictures are written per scene into ``review_files/`` beside the page while the scene is
segmented (:class:`ScenePictures`): a thumbnail (:data:`THUMB_SIDE` px) and a preview
(:data:`PREVIEW_SIDE` px) of each view, JPEG for photographs, PNG for class maps. The list's
thumbnails load lazily (``loading="lazy"``) and rows off screen are not laid out
(``content-visibility``), so pages of thousands of scenes stay fast. Scene names are
untrusted: they reach the page only as JSON data (with ``<``, ``>`` and ``&`` escaped) and are
shown through ``textContent``; file links are percent-encoded.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from res_unet.core.atomic import atomic_path, write_atomic
from res_unet.data import report

PICTURES = "review_files"
THUMB_SIDE = 160
PREVIEW_SIDE = 768
VIEWS = ("image", "prediction", "label", "uncertainty")
_JPEG_QUALITY = 85


def review_file(shard: tuple[int, int]) -> str:
    """review.html, or review_shard{i}of{n}.html for shard i of n (as scores.csv)."""
    index, count = shard
    return "review.html" if count == 1 else f"review_shard{index}of{count}.html"


def picture_step(shape_hw: Sequence[int], side: int = PREVIEW_SIDE) -> int:
    """Every n-th row and column that brings ``shape_hw`` to at most ``side`` px a side."""
    return max(1, math.ceil(max(shape_hw) / side))


def picture_names(stem: str) -> dict[str, dict[str, str]]:
    """{view: {"thumb": name, "preview": name}} of a scene's pictures in :data:`PICTURES`."""
    ext = {"image": "jpg", "prediction": "jpg", "label": "jpg", "uncertainty": "png"}
    return {view: {"thumb": f"{stem}_{view}_thumb.{ext[view]}",
                   "preview": f"{stem}_{view}.{ext[view]}"} for view in VIEWS}


def uncertainty_colours(entropy: np.ndarray) -> np.ndarray:
    """(H, W) normalised entropy in 0-1 (NaN = nodata) -> uint8 RGB: dark blue (sure)
    through yellow to red (unsure); nodata black."""
    value = np.nan_to_num(np.clip(entropy, 0.0, 1.0), nan=0.0)
    stops = np.array([[20, 30, 90], [40, 150, 160], [250, 220, 60], [220, 30, 30]], float)
    position = value * (len(stops) - 1)
    low = np.minimum(position.astype(int), len(stops) - 2)
    t = (position - low)[..., None]
    rgb = stops[low] * (1 - t) + stops[low + 1] * t
    rgb[np.isnan(entropy)] = 0
    return np.rint(rgb).astype(np.uint8)


def _save(path: Path, rgb: np.ndarray, side: int) -> None:
    picture = Image.fromarray(np.ascontiguousarray(rgb))
    picture.thumbnail((side, side), Image.Resampling.BILINEAR)
    jpeg = path.suffix == ".jpg"
    with atomic_path(path) as tmp:
        picture.save(tmp, format="JPEG" if jpeg else "PNG",
                     **({"quality": _JPEG_QUALITY} if jpeg else {"compress_level": 1}))


class ScenePictures:
    """The review pictures of one scene, written into ``out_dir/review_files``.

    :meth:`write_prediction` takes the image and label map as the overlay is drawn
    (sub-sampled, every ``step``-th row and column) and the uncertainty thumbnail; it keeps
    the small image so that :meth:`write_label` can overlay the truth the same way.
    """

    def __init__(self, out_dir: Path, stem: str, n_classes: int) -> None:
        self.folder = out_dir / PICTURES
        self.names = picture_names(stem)
        self.n_classes = n_classes
        self.small: np.ndarray | None = None
        self.step = 1

    def _write(self, view: str, rgb: np.ndarray) -> None:
        if self.folder.is_symlink():  # planted at our folder's name: replaced, never followed
            self.folder.unlink(missing_ok=True)
        self.folder.mkdir(exist_ok=True)
        _save(self.folder / self.names[view]["preview"], rgb, PREVIEW_SIDE)
        _save(self.folder / self.names[view]["thumb"], rgb, THUMB_SIDE)

    def write_prediction(self, image: np.ndarray, label: np.ndarray, step: int,
                         entropy: np.ndarray | None) -> None:
        """Write the image, prediction and uncertainty pictures. ``image`` (h, w, B) raw
        pixels and ``label`` (h, w) class indices are every ``step``-th row and column of the
        scene; ``entropy`` is a sub-sampled uncertainty map (or None)."""
        more = picture_step(image.shape[:2])
        self.small, self.step = image[::more, ::more], step * more
        self._write("image", report.to_display_rgb(self.small))
        self._write("prediction", report.overlay_image(self.small, label[::more, ::more],
                                                       self.n_classes))
        if entropy is not None:
            fewer = picture_step(entropy.shape)
            self._write("uncertainty", uncertainty_colours(entropy[::fewer, ::fewer]))

    def write_label(self, truth: np.ndarray) -> None:
        """Write the label picture: ``truth`` (H, W) class indices at full size."""
        if self.small is None:
            return
        small = truth[::self.step, ::self.step][:self.small.shape[0], :self.small.shape[1]]
        image = self.small[:small.shape[0], :small.shape[1]]
        self._write("label", report.overlay_image(image, small, self.n_classes))


# The page ----------------------------------------------------------------------------------

_STYLE = """
body{font:14px system-ui,sans-serif;margin:0;color:#222;background:#f6f6f4}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ccc;padding:8px 12px;
z-index:2}
h1{font-size:17px;margin:0 0 4px}
header button{margin-right:4px}
button.on{background:#264d73;color:#fff}
table{border-collapse:collapse;width:100%}
td,th{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left;vertical-align:middle}
tbody tr{content-visibility:auto;contain-intrinsic-size:auto 92px;cursor:pointer}
tbody tr:hover{background:#e8eef5}
td img{width:84px;height:84px;object-fit:contain;background:#ddd;display:block}
td.num{font-variant-numeric:tabular-nums}
td.name{max-width:240px;overflow-wrap:anywhere}
#large{position:fixed;inset:0;background:rgba(0,0,0,.88);display:none;z-index:3;color:#eee;
padding:12px;box-sizing:border-box}
#large.open{display:flex;flex-direction:column}
#large img{flex:1;min-height:0;object-fit:contain;width:100%}
#large a{color:#9cf;margin-right:10px}
.bar{display:inline-block;height:8px;background:#c33;vertical-align:middle;margin-left:6px}
"""

_SCRIPT = """
const scenes = JSON.parse(document.getElementById('scenes').textContent);
const body = document.getElementById('rows');
const fmt = v => v === null || v === undefined ? '-' : v.toFixed(3);
const url = (folder, name) => (folder ? folder + '/' : '') + encodeURIComponent(name);
let key = 'uncertainty', descending = true;

function picture(scene, view, size) {
  const names = scene.pictures[view];
  return names && names[size] ? url(scene.folder, names[size]) : null;
}

function row(scene, i) {
  const tr = document.createElement('tr');
  tr.dataset.index = i;
  const cell = text => { const td = document.createElement('td'); td.textContent = text;
    tr.appendChild(td); return td; };
  cell(String(scene.rank));
  const name = cell(scene.name); name.className = 'name';
  for (const view of ['image', 'prediction', 'label']) {
    const td = document.createElement('td');
    const src = picture(scene, view, 'thumb');
    if (src) { const img = document.createElement('img'); img.loading = 'lazy';
      img.alt = view; img.src = src; td.appendChild(img); }
    tr.appendChild(td);
  }
  const u = cell(fmt(scene.uncertainty)); u.className = 'num uncertainty';
  if (scene.uncertainty !== null) { const bar = document.createElement('span');
    bar.className = 'bar'; bar.style.width = Math.round(60 * scene.uncertainty) + 'px';
    u.appendChild(bar); }
  cell(fmt(scene.low_confidence)).className = 'num';
  cell(fmt(scene.entropy)).className = 'num';
  cell(fmt(scene.disagreement)).className = 'num';
  cell(fmt(scene.score)).className = 'num score';
  tr.addEventListener('click', () => open_scene(i));
  return tr;
}

const rows = [];  // built once: sorting moves them, it does not rebuild them
function render() {
  const started = performance.now();
  const order = scenes.map((s, i) => i);
  const value = i => scenes[i][key];
  order.sort((a, b) => {
    const x = value(a), y = value(b);
    if (x === null || x === undefined) return (y === null || y === undefined) ? 0 : 1;
    if (y === null || y === undefined) return -1;
    const c = typeof x === 'string' ? x.localeCompare(y) : x - y;
    return descending ? -c : c;
  });
  const fragment = document.createDocumentFragment();
  for (const i of order) fragment.appendChild(rows[i] || (rows[i] = row(scenes[i], i)));
  body.replaceChildren(fragment);
  document.body.dataset.renderMs = Math.round(performance.now() - started);
  for (const b of document.querySelectorAll('button[data-key]'))
    b.classList.toggle('on', b.dataset.key === key);
}

for (const b of document.querySelectorAll('button[data-key]')) {
  b.addEventListener('click', () => {
    descending = b.dataset.key === key ? !descending : b.dataset.key !== 'name';
    key = b.dataset.key; render();
  });
}

const large = document.getElementById('large');
const big = document.getElementById('big');
let current = null;
function show(view) {
  const src = picture(scenes[current], view, 'preview');
  big.src = src || ''; big.alt = src ? view : 'no ' + view + ' picture';
  for (const b of document.querySelectorAll('button[data-view]'))
    b.classList.toggle('on', b.dataset.view === view);
}
function open_scene(i) {
  current = i;
  const scene = scenes[i];
  document.getElementById('title').textContent = scene.name + '  uncertainty ' +
    fmt(scene.uncertainty) + '  score ' + fmt(scene.score);
  const links = document.getElementById('links');
  links.replaceChildren();
  for (const [what, name] of Object.entries(scene.outputs)) {
    const a = document.createElement('a'); a.href = url('', name); a.textContent = what;
    links.appendChild(a);
  }
  for (const b of document.querySelectorAll('button[data-view]'))
    b.disabled = !scene.pictures[b.dataset.view];
  large.classList.add('open'); show('prediction');
}
for (const b of document.querySelectorAll('button[data-view]'))
  b.addEventListener('click', () => show(b.dataset.view));
const close = () => large.classList.remove('open');
document.getElementById('close').addEventListener('click', close);
document.addEventListener('keydown', e => { if (e.key === 'Escape') close(); });
render();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{title}</title>
<style>{style}</style></head>
<body>
<header><h1>{title}</h1>
<div>{summary}</div>
<div>Sort: <button data-key="uncertainty">uncertainty</button><button data-key="score">score
</button><button data-key="name">name</button>
<span>Most uncertain first: label the top of the list next.</span></div></header>
<table><thead><tr><th>rank</th><th>scene</th><th>image</th><th>prediction</th><th>label</th>
<th>uncertainty</th><th>unsure pixels</th><th>entropy</th><th>views disagree</th>
<th>{score_name}</th></tr></thead><tbody id="rows"></tbody></table>
<div id="large"><div><button id="close">close (Esc)</button>
<button data-view="image">image</button><button data-view="prediction">prediction</button>
<button data-view="label">label</button><button data-view="uncertainty">uncertainty</button>
<span id="title"></span></div>
<div id="links"></div><img id="big" alt=""></div>
<script type="application/json" id="scenes">{data}</script>
<script>{script}</script>
</body></html>
"""


def _json_for_html(value: Any) -> str:
    """JSON safe inside a <script> element: no '<', '>' or '&' that could end it."""
    text = json.dumps(value, ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()


def scene_entry(name: str, figures: dict[str, Any] | None, score: float | None,
                outputs: dict[str, Path], out_dir: Path, stem: str) -> dict[str, Any]:
    """One scene of the page: its ``name`` (file name), uncertainty ``figures`` (or None),
    ``score`` (mean IoU against its label, or None), the ``outputs`` that exist (linked by
    their names relative to ``out_dir``) and the pictures of ``stem`` found in
    :data:`PICTURES`."""
    folder = out_dir / PICTURES
    pictures = {view: {size: file for size, file in names.items() if (folder / file).is_file()}
                for view, names in picture_names(stem).items()}
    figures = figures or {}
    return {"name": name, "score": score, "folder": PICTURES,
            **{k: figures.get(k) for k in ("uncertainty", "entropy", "low_confidence",
                                             "margin", "expected_error", "disagreement")},
            "pictures": {view: found for view, found in pictures.items() if found},
            "outputs": {what: path.name for what, path in outputs.items() if path.is_file()}}


def write_review_page(path: Path, scenes: Sequence[dict[str, Any]], title: str,
                      summary: str = "", score_name: str = "mean IoU") -> None:
    """Write the page (atomically) listing ``scenes`` (:func:`scene_entry`), ranked most
    uncertain first; ``summary`` is one line of text under the title."""
    def key(scene: dict[str, Any]) -> tuple[bool, float, str]:
        value = scene.get("uncertainty")
        return value is None, -(value or 0.0), scene["name"]

    ranked = [{**scene, "rank": rank} for rank, scene in enumerate(sorted(scenes, key=key), 1)]
    csp = ("default-src 'none'; img-src 'self' data:; "
           f"style-src 'sha256-{_sha256(_STYLE)}'; script-src 'sha256-{_sha256(_SCRIPT)}'; "
           "base-uri 'none'; form-action 'none'")
    page = _PAGE.format(csp=csp, title=html.escape(title), summary=html.escape(summary),
                        score_name=html.escape(score_name), style=_STYLE,
                        data=_json_for_html(ranked), script=_SCRIPT)
    write_atomic(path, page)
