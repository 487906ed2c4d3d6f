#!/bin/bash
# Usage: bench/outputs_digest.sh OUT [REPO]: the same dataset and four segmentations (demo PNGs;
# 3 lakes scenes as georeferenced GeoTIFFs with COGs, probabilities and GeoJSON; 3 Dubai scenes
# with GeoPackage polygons; the residual U-Net with CRF and median), every output hashed into
# OUT/SHA256SUMS: run before and after a change that must not change outputs, then diff the two.
# Needs ../shared/data beside the repository; PYTHON defaults to .venv/bin/python.
set -e
OUT=$(realpath -m "$1"); REPO=$(realpath "${2:-$(dirname "$0")/..}")
PY=${PYTHON:-$REPO/.venv/bin/python}; DATA=$(realpath "$REPO/../shared/data")
export PYTHONPATH=$REPO RES_UNET_CACHE_DIR=$OUT/cache
if [ -e "$OUT" ]; then echo "$OUT exists: give a new folder" >&2; exit 2; fi
mkdir -p "$OUT"
cd $REPO
# inputs: demo PNGs, 3 lakes scenes as georeferenced GeoTIFFs (UTM 33N, 40 m), 3 Dubai JPEGs
$PY -m res_unet.demo --out $OUT/in/demo --count 12 --test-count 4 --size 128 --seed 0 >/dev/null
$PY - "$OUT" "$DATA" <<'PY'
import sys, numpy as np, rasterio
from rasterio.transform import from_origin
from pathlib import Path
from PIL import Image
out = Path(sys.argv[1]); d = out / "in/geo"; (d / "images").mkdir(parents=True); (d / "labels").mkdir()
src = Path(sys.argv[2]) / "lakes"
for i, f in enumerate(sorted((src / "images").glob("*.jpg"))[:3]):
    a = np.asarray(Image.open(f).convert("RGB"))[:300, :400]
    lab = np.asarray(Image.open(src / "labels" / (f.stem + ".png")))[:300, :400]
    t = from_origin(500000 + i * 20000, 6000000, 40, 40)
    with rasterio.open(d / "images" / f"{f.stem}.tif", "w", driver="GTiff", width=a.shape[1], height=a.shape[0], count=3, dtype="uint8", crs="EPSG:32633", transform=t) as ds:
        ds.write(np.moveaxis(a, -1, 0))
    with rasterio.open(d / "labels" / f"{f.stem}.tif", "w", driver="GTiff", width=a.shape[1], height=a.shape[0], count=1, dtype="uint8", crs="EPSG:32633", transform=t) as ds:
        ds.write(lab[None])
dd = out / "in/dubai"; (dd / "images").mkdir(parents=True); (dd / "labels").mkdir()
sd = Path(sys.argv[2]) / "dubai"
for f in sorted((sd / "images").glob("*.jpg"))[:3]:
    Image.open(f).save(dd / "images" / f.name)
    Image.open(sd / "labels" / (f.stem + ".png")).save(dd / "labels" / (f.stem + ".png"))
PY
$PY -m res_unet.make_tfrecords --config config/demo.json --images $OUT/in/demo/train/images --labels $OUT/in/demo/train/labels --out $OUT/dataset --workers 1 >$OUT/mt.log 2>&1
$PY -m res_unet.seg_images_in_folder --model weights/lakes_lite0 --images $OUT/in/demo/test/images --labels $OUT/in/demo/test/labels --out $OUT/seg_demo --save-probs --vector gpkg --no-progress >$OUT/s1.log 2>&1
$PY -m res_unet.seg_images_in_folder --model weights/lakes_lite0 --images $OUT/in/geo/images --labels $OUT/in/geo/labels --out $OUT/seg_geo --save-probs --vector geojson --no-progress >$OUT/s2.log 2>&1
$PY -m res_unet.seg_images_in_folder --model weights/dubai_lite0 --images $OUT/in/dubai/images --labels $OUT/in/dubai/labels --out $OUT/seg_dubai --vector gpkg --no-progress >$OUT/s3.log 2>&1
$PY -m res_unet.seg_images_in_folder --model weights/lakes_resunet --images $OUT/in/geo/images --out $OUT/seg_resunet --runtime tensorflow --crf --median 3 --no-progress >$OUT/s4.log 2>&1
cd $OUT && find dataset seg_* -type f ! -name '*.log' | sort | xargs sha256sum > $OUT/SHA256SUMS
wc -l $OUT/SHA256SUMS
