"""A real S3 endpoint (moto's threaded server on 127.0.0.1) and a fresh bucket per test."""

from __future__ import annotations

import logging
import urllib.request
import uuid

import pytest

from jasper_mmap.remote import upload_store


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


class Bucket:
    def __init__(self, endpoint: str, name: str, tmp) -> None:
        self.endpoint, self.name, self.tmp = endpoint, name, tmp
        self._n = 0

    def url(self, prefix: str = "ds") -> str:
        return f"s3://{self.name}/{prefix}"

    def cache(self, tag: str | None = None):
        self._n += 1
        d = self.tmp / f"cache-{tag or self._n}"
        d.mkdir(exist_ok=True)
        return d

    def upload(self, store, prefix: str = "ds", **kw) -> str:
        url = self.url(prefix)
        kw.setdefault("unit_rows", 16)
        upload_store(store, url, **kw)
        return url


@pytest.fixture
def bucket(s3_endpoint, monkeypatch, tmp_path):
    """A fresh, empty bucket; the AWS_* environment pointing at the test server."""
    name = f"t-{uuid.uuid4().hex[:20]}"
    urllib.request.urlopen(urllib.request.Request(f"{s3_endpoint}/{name}", method="PUT")).close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("JASPER_MMAP_CACHE", str(tmp_path / "default-cache"))
    return Bucket(s3_endpoint, name, tmp_path)
