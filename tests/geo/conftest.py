"""Fixtures of the GIS tests: a local HTTP server with Range requests (no network)."""

from __future__ import annotations

import pytest
from range_server import RangeServer


@pytest.fixture
def http_root(tmp_path):
    """The folder the test's HTTP server serves."""
    root = tmp_path / "served"
    root.mkdir()
    return root


@pytest.fixture
def server(http_root, monkeypatch):
    """A threaded HTTP server of ``http_root`` (Range requests, ETags, byte counts), with
    GDAL's retries short so that a dropped connection fails in well under a second."""
    from res_unet.geo.remote import GDAL_HTTP_SETTINGS

    # Set through monkeypatch, so that GDAL's remote settings leave with the test.
    for key, value in GDAL_HTTP_SETTINGS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "1")
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.05")
    served = RangeServer(http_root)
    yield served
    served.close()
