"""What ``--images`` names, as scenes to read: a folder, one raster by path or URL, a text
file listing paths and URLs, or a STAC catalogue (:mod:`res_unet.geo.stac`), optionally
clipped to an area of interest.

A :class:`SceneQuery` holds the command line's choice; :func:`resolve_scenes` turns it into
:class:`SceneRef` (a plain name, the GDAL path of each asset, what to show and a stable
key); :func:`scene_folder` writes each scene as a small GDAL VRT (``NAME.vrt``: the assets
stacked band by band, resampled to the first one's grid, cut to the area, at the COG
overview that matches a coarser model) in a private temporary folder that the rest of
res_unet reads like a folder of GeoTIFFs, in windows: GDAL fetches only the internal tiles
a window covers. ``scenes.json`` beside the VRTs records, for each scene, where it came
from (credentials stripped, :func:`res_unet.geo.remote.redact`) and its key: the URL and
ETag (or Last-Modified) of a remote file, the path, size and modification time of a local
one; resuming keys remote scenes by it.

A plain folder with no area is left as it is (nothing here runs). A scene whose header
cannot be read fails with one line and the others go on; scenes the area misses are
skipped with one note.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rasterio
import rasterio.errors
import shapely
from rasterio.crs import CRS

from res_unet.core import messages
from res_unet.core.errors import UserError
from res_unet.geo import remote, stac, vectors, vrt

# Beside the VRTs of a scene folder: where each scene came from, its key, the failures.
SCENES_FILE = "scenes.json"
VRT_SUFFIX = ".vrt"
_RASTER_SUFFIXES = (".tif", ".tiff", ".jp2")


@dataclass(frozen=True)
class SceneQuery:
    """``--images`` and the options that pick and cut scenes (see :func:`add_arguments`)."""

    images: str | None
    assets: tuple[str, ...] = ()
    datetime: str | None = None
    max_items: int | None = None
    bbox: tuple[float, float, float, float] | None = None
    aoi: str | None = None
    stac_search: str | None = None
    collection: str | None = None
    overview: bool = True

    @property
    def plain_folder(self) -> bool:
        """A local folder read as it is (no catalogue, no area): the old path, unchanged."""
        return (self.images is not None and self.stac_search is None and self.bbox is None
                and self.aoi is None and not remote.is_remote(self.images)
                and Path(self.images).is_dir())

    @property
    def shown(self) -> str:
        """What the query reads, for records and messages (credentials stripped)."""
        return remote.redact(self.stac_search or self.images or "")


@dataclass(frozen=True)
class SceneRef:
    """One scene: ``name`` (a plain file name), ``sources`` (the GDAL path of each asset,
    bands stacked in order), ``shown`` (its source without credentials) and ``key``
    (what identifies this version of it)."""

    name: str
    sources: tuple[str, ...]
    shown: str
    key: str


@dataclass
class SceneFolder:
    """What :func:`scene_folder` made: ``folder`` of NAME.vrt, ``failed`` scenes (one line
    each), the names the area ``missed``."""

    folder: Path
    failed: list[dict[str, str]] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)


# Command line ------------------------------------------------------------------------------

def _bbox(text: str) -> tuple[float, float, float, float]:
    try:
        w, s, e, n = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be W,S,E,N in degrees") from None
    if not (-180 <= w < e <= 180 and -90 <= s < n <= 90):
        raise argparse.ArgumentTypeError(f"{text!r}: need -180 <= W < E <= 180 and "
                                         "-90 <= S < N <= 90 (longitude/latitude)")
    return w, s, e, n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scene options of make_tfrecords and seg_images_in_folder (``--images`` aside)."""
    group = parser.add_argument_group("scenes from URLs and STAC catalogues")
    group.add_argument("--asset", metavar="NAME[,NAME]",
                       help="STAC assets to read: one multi-band asset (visual) or one per "
                            "band (red,green,blue,nir), stacked in order on the first's grid")
    group.add_argument("--datetime", metavar="START/END",
                       help="only items dated in this range (ISO 8601; '..' leaves an end open)")
    group.add_argument("--max-items", type=int, metavar="N", help="at most N items")
    group.add_argument("--bbox", type=_bbox, metavar="W,S,E,N",
                       help="read only this area (longitude/latitude); scenes it misses are "
                            "skipped")
    group.add_argument("--aoi", metavar="FILE",
                       help="read only the area of this polygon layer (.gpkg .geojson .shp), "
                            "reprojected to each scene")
    group.add_argument("--stac-search", metavar="URL",
                       help="search this STAC API (with --collection; needs pystac-client)")
    group.add_argument("--collection", metavar="NAME", help="the collection --stac-search reads")
    group.add_argument("--full-resolution", action="store_true",
                       help="read scenes at full resolution even when the model works coarser "
                            "(default: the matching COG overview)")


def query_from_args(args: argparse.Namespace) -> SceneQuery:
    """The :class:`SceneQuery` of parsed arguments. Raises UserError for contradictions."""
    if (args.stac_search is None) != (args.collection is None):
        raise UserError("command line: --stac-search URL and --collection NAME go together")
    if args.max_items is not None and args.max_items < 1:
        raise UserError("command line: --max-items must be at least 1")
    if args.bbox is not None and args.aoi is not None:
        raise UserError("command line: give --bbox or --aoi, not both")
    assets = tuple(a.strip() for a in (args.asset or "").split(",") if a.strip())
    return SceneQuery(args.images, assets, args.datetime, args.max_items, args.bbox,
                      args.aoi, args.stac_search, args.collection, not args.full_resolution)


# Scenes -----------------------------------------------------------------------------------

def _local_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _source_key(href: str) -> str:
    """A stable key of one asset: the redacted URL and its version tag (ETag/Last-Modified)
    for a remote file; path, size and modification time for a local one."""
    if remote.is_remote(href):
        tag = remote.version_tag(href) if remote.scheme(href) else None
        return f"{remote.redact_url(href)}|{tag or 'unversioned'}"
    path = Path(href)
    return _local_key(path) if path.is_file() else str(path)


def _name_of(location: str) -> str:
    """The output name of a scene: a local file's stem, or a URL's file stem if it is a plain
    name (UserError otherwise: a stranger's URL names no folder of ours)."""
    if not (remote.is_remote(location) or remote.is_gdal_path(location)):
        return Path(location).stem
    path = urllib.parse.urlsplit(location).path if remote.scheme(location) else location
    return stac.plain_name(Path(path).stem, remote.redact_url(location))


def _ref(name: str, hrefs: Sequence[str]) -> SceneRef:
    return SceneRef(name, tuple(remote.gdal_path(h) for h in hrefs),
                    ", ".join(remote.redact_url(h) for h in hrefs),
                    "+".join(_source_key(h) for h in hrefs))


def _listed(path: Path) -> list[str]:
    """The paths and URLs of a list file, one a line ('#' comments), relative paths
    resolved against the list's folder."""
    lines = [line.strip() for line in remote.read_text(str(path), "list of scenes").splitlines()]
    entries = []
    for line in lines:
        if not line or line.startswith("#"):
            continue
        local = not (remote.is_remote(line) or remote.is_gdal_path(line))
        entries.append(str((path.parent / line).resolve()) if local else line)
    if not entries:
        raise UserError(f"{path}: lists no scenes; put one path or URL per line")
    return entries


def _from_search(query: SceneQuery) -> list[SceneRef]:
    found = stac.search_scenes(query.stac_search or "", query.collection or "", query.assets,
                               query.datetime, query.max_items, query.bbox)
    return [_ref(s.name, s.hrefs) for s in found]


def _from_catalogue(query: SceneQuery) -> list[SceneRef]:
    found = stac.catalogue_scenes(query.images or "", query.assets, query.datetime,
                                  query.max_items, query.bbox)
    return [_ref(s.name, s.hrefs) for s in found]


def _from_address(query: SceneQuery) -> list[SceneRef]:
    images = query.images or ""
    return [_ref(_name_of(images), [images])]


def _from_folder(query: SceneQuery) -> list[SceneRef]:
    path = Path(query.images or "")
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and p.suffix.lower() in _RASTER_SUFFIXES)
    if not files:
        raise UserError(f"{path}: no GeoTIFFs (.tif) to cut to the area; --bbox and --aoi "
                        "need georeferenced scenes")
    return [_ref(_name_of(str(p)), [str(p)]) for p in files]


def _from_list(query: SceneQuery) -> list[SceneRef]:
    path = Path(query.images or "")
    refs = []
    for entry in _listed(path):
        if stac.looks_like_stac(entry):
            raise UserError(f"{path}: lists a catalogue ({remote.redact_url(entry)}); give "
                            "the catalogue itself with --images")
        refs.append(_ref(_name_of(entry), [entry]))
    names = [r.name for r in refs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"{path}: two scenes are named {repeated[0]}; outputs are named "
                        "after files: rename one")
    return refs


@dataclass(frozen=True)
class SceneSource:
    """One kind of ``--images``: ``takes(query)`` says whether the query names one,
    ``resolve(query)`` lists its scenes (UserError for what it refuses), ``picks_items``
    whether --asset, --datetime and --max-items apply to it (catalogues)."""

    name: str
    takes: Callable[[SceneQuery], bool]
    resolve: Callable[[SceneQuery], list[SceneRef]]
    picks_items: bool = False


def _local_raster(query: SceneQuery) -> bool:
    path = Path(query.images or "")
    return path.is_file() and path.suffix.lower() in _RASTER_SUFFIXES


# The kinds of --images, tried in order: the first that takes the query lists its scenes.
# A new kind of scene source is a resolve function (in a module of its own, as stac.py is)
# and one entry here.
SCENE_SOURCES: tuple[SceneSource, ...] = (
    SceneSource("STAC API search", lambda q: q.stac_search is not None, _from_search,
                picks_items=True),
    SceneSource("STAC catalogue", lambda q: stac.looks_like_stac(q.images or ""),
                _from_catalogue, picks_items=True),
    SceneSource("URL or GDAL path", lambda q: remote.is_remote(q.images or "")
                or remote.is_gdal_path(q.images or ""), _from_address),
    SceneSource("folder", lambda q: Path(q.images or "").is_dir(), _from_folder),
    SceneSource("raster file", _local_raster, _from_address),
    SceneSource("list of scenes", lambda q: Path(q.images or "").is_file(), _from_list),
)


def resolve_scenes(query: SceneQuery) -> list[SceneRef]:
    """The scenes ``query`` names, in order, from the first of :data:`SCENE_SOURCES` that
    takes it. Raises UserError for a missing path, a name that is not a plain file name,
    and what :mod:`res_unet.geo.stac` refuses."""
    images = query.images or ""
    for source in SCENE_SOURCES:
        if not source.takes(query):
            continue
        if not source.picks_items and (query.assets or query.datetime or query.max_items):
            raise UserError(f"{remote.redact_url(images)}: --asset, --datetime and --max-items "
                            "pick items of a STAC catalogue; give one (a .json) with --images")
        return source.resolve(query)
    raise UserError(f"{images}: no such folder, file or URL; check --images")


# The area of interest ----------------------------------------------------------------------

def area_of_interest(query: SceneQuery) -> tuple[Any, CRS] | None:
    """The area to cut scenes to, as (a shapely geometry, its CRS): ``--bbox`` in WGS 84,
    or the union of ``--aoi``'s polygons in the layer's CRS. None without either."""
    if query.bbox is not None:
        return shapely.box(*query.bbox), CRS.from_epsg(4326)
    if query.aoi is not None:
        return layer_area(query.aoi)
    return None


def layer_area(path: str | os.PathLike, layer: str | None = None) -> tuple[Any, CRS]:
    """The union of a polygon layer's features and its CRS. Raises UserError for an empty
    layer (and whatever :func:`res_unet.geo.vectors.read_vector_labels` refuses)."""
    labels = vectors.read_vector_labels(path, layer)
    if not len(labels):
        raise UserError(f"{labels.where}: holds no polygons, so there is no area to read")
    return shapely.union_all(labels.geometries), labels.crs


def _write_scenes(query: SceneQuery, folder: Path, model_pixel_size: float | None,
                  area: tuple[Any, CRS] | None) -> SceneFolder:
    refs = resolve_scenes(query)
    if not refs:
        raise UserError(f"{query.shown}: no items to read (after --datetime and --bbox); "
                        "widen the dates or the area")
    if any(remote.is_remote(source) for ref in refs for source in ref.sources):
        # Only then: no directory listing would also hide a local file's sidecars (.tfw).
        remote.configure_gdal()
    result = SceneFolder(folder)
    records: dict[str, Any] = {}
    for ref in refs:
        try:
            made = vrt.scene_vrt(ref.sources, ref.shown, area,
                                 model_pixel_size if query.overview else None)
        except (rasterio.errors.RasterioError, OSError) as exc:
            problem = " ".join(remote.redact(str(exc)).split())
            message = (f"{ref.shown}: cannot be read ({problem}); check the address and the "
                       "network, then run again (finished scenes are skipped)")
            messages.status(f"failed: {message}")
            result.failed.append({"name": ref.name, "image": ref.shown, "error": message})
            continue
        if made is None:
            result.missed.append(ref.name)
            continue
        xml, facts = made
        (folder / f"{ref.name}{VRT_SUFFIX}").write_text(xml, encoding="utf-8")
        records[ref.name] = {"source": ref.shown, "key": ref.key, **facts}
    if result.missed:
        shown = ", ".join(result.missed[:10]) + (" ..." if len(result.missed) > 10 else "")
        messages.note(f"the area of interest misses {len(result.missed)} of {len(refs)} scenes "
                      f"({shown}); skipped")
    if not records and not result.missed:
        raise UserError(f"{query.shown}: none of the {len(refs)} scenes could be read "
                        f"(first: {result.failed[0]['error']})")
    if not records:
        raise UserError(f"{query.shown}: the area of interest touches none of the "
                        f"{len(refs) - len(result.failed)} scenes read; check --bbox/--aoi "
                        "(W,S,E,N in degrees)")
    (folder / SCENES_FILE).write_text(json.dumps(
        {"images": query.shown, "scenes": records, "failed": result.failed}, indent=1),
        encoding="utf-8")
    return result


@contextlib.contextmanager
def scene_folder(query: SceneQuery, model_pixel_size: float | None = None,
                 area: tuple[Any, CRS] | None = None) -> Iterator[SceneFolder]:
    """A folder of the query's scenes as NAME.vrt (see the module's docstring), removed on
    exit; a plain folder (:attr:`SceneQuery.plain_folder`) is yielded as it is. ``area``
    overrides the query's --bbox/--aoi (make_tfrecords passes its labels' area).
    ``model_pixel_size``: metres per pixel the model works at (None: unknown), for the
    overview read."""
    if query.plain_folder and area is None:
        yield SceneFolder(Path(query.images or "."))
        return
    area = area if area is not None else area_of_interest(query)
    folder = Path(tempfile.mkdtemp(prefix="res_unet-scenes-"))
    try:
        yield _write_scenes(query, folder, model_pixel_size, area)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@functools.lru_cache(maxsize=8)
def _records(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / SCENES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def is_scene_folder(folder: Path) -> bool:
    """Whether ``folder`` was made by :func:`scene_folder` (it holds :data:`SCENES_FILE`)."""
    return bool(_records(Path(folder)))


def scene_record(image: Path) -> dict[str, Any] | None:
    """The record of a scene of a scene folder (source, key, window, overview), or None for
    an image elsewhere."""
    return _records(Path(image).parent).get("scenes", {}).get(Path(image).stem)


def folder_shown(folder: Path) -> str:
    """What a manifest records as the images of ``folder``: the query a scene folder was
    made from (no credentials), else the folder's absolute path."""
    return _records(Path(folder)).get("images") or str(Path(folder).resolve())


def shown(image: Path) -> str:
    """How to name ``image`` to users: its source for a scene (no credentials), else itself."""
    record = scene_record(image)
    return str(image) if record is None else record["source"]
