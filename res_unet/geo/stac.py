"""STAC catalogues as lists of scenes: an Item, ItemCollection, Collection or Catalog (JSON,
local or over HTTP(S)) read with pystac, or a STAC API searched with pystac-client (an
optional extra).

Each item becomes a :class:`StacScene`: a plain file name (the item id; with the date when
ids repeat), the absolute hrefs of the assets asked for (``--asset``, in order) and its
date. Relative hrefs resolve against the location of the document that holds them, as STAC
says.

Nothing in a stranger's catalogue is trusted: in a catalogue read over the network, an
asset or link naming a local file (``file://``, an absolute path, a GDAL ``/vsi`` path) or
a relative href climbing above the catalogue's own folder (``../``) is refused with one
line, and an item id that is not a plain file name is refused rather than cleaned into
one. The catalogue is data: nothing in it is run.
"""

from __future__ import annotations

import datetime as dt
import json
import posixpath
import re
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from res_unet.core.errors import UserError
from res_unet.geo import remote

# An item id used as a file name: letters, digits, '.', '_' and '-', not starting with '.'.
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
# Media types (and href suffixes) of rasters GDAL reads in windows.
_RASTER_TYPES = ("image/tiff", "image/jp2", "image/vnd.stac.geotiff")
_RASTER_SUFFIXES = (".tif", ".tiff", ".jp2")


@dataclass(frozen=True)
class StacScene:
    """One catalogue item to read: ``name`` (a plain file name), ``hrefs`` (the absolute
    href of each asset asked for, in order: URLs or local paths), ``assets`` (their names)
    and ``datetime`` (ISO 8601, or None)."""

    name: str
    hrefs: tuple[str, ...]
    assets: tuple[str, ...]
    datetime: str | None


def looks_like_stac(location: str) -> bool:
    """Whether ``--images`` names a STAC document (by its suffix: .json or .geojson)."""
    path = urllib.parse.urlsplit(location).path if remote.scheme(location) else location
    return path.lower().endswith((".json", ".geojson"))


def _resolve(href: str, base: str) -> str:
    """``href`` made absolute against ``base`` (a URL or a local file path)."""
    if remote.scheme(href) or href.startswith("file://") or href.startswith("/"):
        return href
    if remote.scheme(base):
        return urllib.parse.urljoin(base, href)
    return str((Path(base).parent / href).resolve())


def _check_href(href: str, base: str, root: str, catalogue: str) -> str:
    """The absolute href of ``href`` found in the document at ``base``; for a catalogue read
    over the network (``root`` a URL), UserError for anything local or climbing out."""
    absolute = _resolve(href, base)
    if not remote.scheme(root):
        if absolute.startswith("file://"):
            absolute = urllib.parse.unquote(urllib.parse.urlsplit(absolute).path)
        return absolute
    local = (href.startswith(("file:", "/")) or remote.is_gdal_path(href)
             or not remote.scheme(absolute))
    root_dir = posixpath.dirname(urllib.parse.urlsplit(root).path).rstrip("/") + "/"
    split = urllib.parse.urlsplit(absolute)
    climbs = (not remote.scheme(href) and (
        urllib.parse.urlsplit(root).netloc != split.netloc
        or not posixpath.normpath(split.path).startswith(root_dir)))
    if local or climbs:
        where = "a local file" if local else "a file outside the catalogue's folder"
        raise UserError(f"{remote.redact_url(catalogue)}: refers to {where} "
                        f"({remote.redact(href)}); a catalogue read over the network may "
                        "name only http(s)/s3/gs/az addresses below its own folder: fix the "
                        "catalogue, or download it and its files and use them locally")
    return absolute


class _GuardedIO:
    """A pystac StacIO that reads links with :func:`remote.read_text` and the href rules
    of :func:`_check_href` (the root catalogue's location decides what is allowed)."""

    def __init__(self, root: str) -> None:
        import pystac

        self.root = root
        self.refusal: UserError | None = None  # pystac wraps errors: the first, kept
        base, guard = pystac.StacIO, self

        class IO(base):  # type: ignore[misc, valid-type]
            def read_text(io_self, source: Any, *args: Any, **kwargs: Any) -> str:
                href = str(getattr(source, "href", source))
                try:
                    href = _check_href(href, root, root, root)
                    return remote.read_text(href, "STAC catalogue")
                except UserError as exc:
                    guard.refusal = guard.refusal or exc
                    raise

            def write_text(io_self, *args: Any, **kwargs: Any) -> None:
                raise UserError(f"{remote.redact_url(root)}: res_unet never writes "
                                "catalogues")

        self.io = IO()


def _parse_time(text: str, where: str) -> dt.datetime | None:
    if text in ("", ".."):
        return None
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UserError(f"{where}: {text!r} is not a date; use ISO 8601, like "
                        "2024-05-01/2024-09-30 or 2024-05-01T00:00:00Z/..") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def parse_datetime_range(text: str | None) -> tuple[dt.datetime | None, dt.datetime | None]:
    """``--datetime START/END`` (either may be '..', open) as UTC datetimes; one date means
    that day (or that instant). Raises UserError for anything else."""
    if text is None:
        return None, None
    where = f"command line: --datetime {text}"
    if "/" not in text:
        start = _parse_time(text, where)
        end = start + dt.timedelta(days=1) - dt.timedelta(microseconds=1) \
            if start is not None and "T" not in text else start
        return start, end
    first, _, last = text.partition("/")
    start, end = _parse_time(first, where), _parse_time(last, where)
    if start is not None and end is not None and end < start:
        raise UserError(f"{where}: the end comes before the start; give START/END")
    if end is not None and "T" not in last:
        end += dt.timedelta(days=1) - dt.timedelta(microseconds=1)
    return start, end


def _item_times(item: Any) -> tuple[dt.datetime | None, dt.datetime | None]:
    props = item.properties
    start = props.get("start_datetime") or props.get("datetime")
    end = props.get("end_datetime") or props.get("datetime")
    where = f"item {item.id}"
    return (_parse_time(start, where) if start else None,
            _parse_time(end, where) if end else None)


def _in_range(item: Any, start: dt.datetime | None, end: dt.datetime | None) -> bool:
    first, last = _item_times(item)
    if start is not None and last is not None and last < start:
        return False
    return not (end is not None and first is not None and first > end)


def _touches(item: Any, bbox: Sequence[float] | None) -> bool:
    if bbox is None or not item.bbox or len(item.bbox) < 4:
        return True
    box = item.bbox
    w, s, e, n = (box[0], box[1], box[3], box[4]) if len(box) == 6 else box[:4]
    return not (e < bbox[0] or w > bbox[2] or n < bbox[1] or s > bbox[3])


def _choose_assets(item: Any, assets: Sequence[str], where: str) -> tuple[str, ...]:
    """The asset names to read: ``assets`` (each must exist), else the item's one raster
    asset with role 'data', else 'visual'."""
    available = list(item.assets)
    if assets:
        missing = [a for a in assets if a not in item.assets]
        if missing:
            raise UserError(f"{where}: item {item.id} has no asset {missing[0]!r}; its assets "
                            f"are {', '.join(available) or 'none'}: pick with --asset")
        return tuple(assets)
    rasters = [k for k, a in item.assets.items()
               if (a.media_type or "").split(";")[0] in _RASTER_TYPES
               or urllib.parse.urlsplit(a.href).path.lower().endswith(_RASTER_SUFFIXES)]
    data = [k for k in rasters if "data" in (item.assets[k].roles or [])]
    for choice in (data if len(data) == 1 else [], ["visual"] if "visual" in rasters else [],
                   rasters if len(rasters) == 1 else []):
        if choice:
            return (choice[0],)
    raise UserError(f"{where}: item {item.id} has {len(rasters)} raster assets "
                    f"({', '.join(rasters) or 'none'}); choose with --asset NAME (one "
                    "multi-band asset) or --asset red,green,blue (one per band)")


def plain_name(item_id: str, where: str) -> str:
    """``item_id`` as an output file name, unchanged; UserError unless it is a plain name
    (letters, digits, '.', '_', '-'; no folders, no leading dot)."""
    if not _PLAIN_NAME.match(item_id) or ".." in item_id:
        raise UserError(f"{where}: item id {item_id[:80]!r} is not a plain file name "
                        "(letters, digits, '.', '_', '-'); outputs are named after item ids: "
                        "fix the catalogue")
    return item_id


def _scenes(items: Iterable[Any], location: str, root: str, assets: Sequence[str],
            start: dt.datetime | None, end: dt.datetime | None, max_items: int | None,
            bbox: Sequence[float] | None) -> list[StacScene]:
    where = remote.redact_url(location)
    chosen = []
    for item in items:
        if not (_in_range(item, start, end) and _touches(item, bbox)):
            continue
        chosen.append(item)
        if max_items is not None and len(chosen) >= max_items:
            break
    counts: dict[str, int] = {}
    for item in chosen:
        counts[item.id] = counts.get(item.id, 0) + 1
    scenes, names = [], set()
    for item in chosen:
        name = plain_name(str(item.id), where)
        stamp = _item_times(item)[0]
        if counts[item.id] > 1 and stamp is not None:
            name = f"{name}_{stamp:%Y%m%dT%H%M%S}"
        if name in names:
            raise UserError(f"{where}: two items are named {name}; outputs are named after "
                            "item ids: fix the catalogue, or pick with --datetime")
        names.add(name)
        keys = _choose_assets(item, assets, where)
        base = item.get_self_href() or location
        hrefs = tuple(_check_href(item.assets[k].href, base, root, location) for k in keys)
        scenes.append(StacScene(name, hrefs, keys,
                                None if stamp is None else stamp.isoformat()))
    return scenes


def catalogue_scenes(location: str, assets: Sequence[str] = (), datetime: str | None = None,
                     max_items: int | None = None, bbox: Sequence[float] | None = None
                     ) -> list[StacScene]:
    """The scenes of the STAC document at ``location`` (a local path or an http(s) URL):
    an Item, an ItemCollection (FeatureCollection), or a Collection/Catalog (its items,
    followed through child links). Items are kept in catalogue order when their date falls
    in ``datetime`` ('START/END') and their bbox touches ``bbox`` (lon/lat), at most
    ``max_items``. Raises UserError for a document that is not STAC, for missing assets and
    for anything :func:`_check_href` or :func:`plain_name` refuse."""
    import pystac

    start, end = parse_datetime_range(datetime)
    text = remote.read_text(location, "STAC catalogue")
    where = remote.redact_url(location)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not JSON ({exc.msg} at line {exc.lineno}); give a STAC "
                        "Item, ItemCollection, Collection or Catalog") from None
    kind = document.get("type") if isinstance(document, dict) else None
    root = location if remote.scheme(location) else str(Path(location).resolve())
    guard = _GuardedIO(root)
    guarded = guard.io
    try:
        if kind == "FeatureCollection":
            items: Iterable[Any] = pystac.ItemCollection.from_dict(document).items
        elif kind in ("Feature", "Collection", "Catalog"):
            obj = pystac.read_dict(document, href=root, stac_io=guarded)
            if kind == "Feature":
                items = [obj]
            else:
                obj._stac_io = guarded  # links are followed through the guarded reader
                items = obj.get_items(recursive=True)
        else:
            raise UserError(f"{where}: not a STAC document (its type is {kind!r}); give a "
                            "STAC Item, ItemCollection, Collection or Catalog")
        return _scenes(items, root, root, assets, start, end, max_items, bbox)
    except (pystac.STACError, KeyError, TypeError, ValueError) as exc:
        if guard.refusal is not None:
            raise guard.refusal from None
        raise UserError(f"{where}: not a valid STAC document ({remote.redact(str(exc))}); "
                        "check it with stac-validator") from None


def search_scenes(url: str, collection: str, assets: Sequence[str] = (),
                  datetime: str | None = None, max_items: int | None = None,
                  bbox: Sequence[float] | None = None) -> list[StacScene]:
    """The scenes a STAC API at ``url`` finds in ``collection`` (pystac-client, the 'stac'
    extra), filtered as :func:`catalogue_scenes` filters."""
    try:
        from pystac_client import Client
    except ImportError:
        raise UserError("command line: --stac-search needs pystac-client; pip install "
                        "'res_unet[stac]' (or pystac-client)") from None
    parse_datetime_range(datetime)  # one line for a bad date, before any request
    try:
        search = Client.open(url).search(collections=[collection], bbox=bbox,
                                         datetime=datetime, max_items=max_items)
        items = list(search.items())
    except Exception as exc:  # pystac-client raises many kinds: one line
        raise UserError(f"{remote.redact_url(url)}: the STAC search failed "
                        f"({remote.redact(str(exc))[:200]}); check the URL and --collection"
                        ) from None
    return _scenes(items, url, url, assets, None, None, max_items, bbox)
