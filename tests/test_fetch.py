"""`distmeta data fetch omniglot` against a real HTTP server on localhost serving the Omniglot zips."""

import functools
import hashlib
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from distmeta.cli import main
from distmeta.data.download import DownloadError, download
from distmeta.data.omniglot import PARTS, fetch_omniglot
from distmeta.data.shards import ShardedDataset


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(omniglot_src):
    """http://127.0.0.1:PORT serving the folder that holds the zips."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(omniglot_src)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fetch_downloads_verifies_and_builds(omniglot_src, mirror, tmp_path):
    md5 = {part: hashlib.md5((omniglot_src / f"{part}.zip").read_bytes()).hexdigest() for part in PARTS}
    lines = []
    fetch_omniglot(tmp_path, url=mirror, md5=md5, progress=lines.append)
    assert len(ShardedDataset(tmp_path).classes) == 1623
    for part in PARTS:
        assert (tmp_path / "downloads" / f"{part}.zip").read_bytes() == (omniglot_src / f"{part}.zip").read_bytes()
    assert any("MB/s, ETA" in line for line in lines)  # progress: size, rate, ETA
    lines.clear()
    built = (tmp_path / "manifest.json").stat().st_mtime_ns
    fetch_omniglot(tmp_path, url=mirror, md5=md5, progress=lines.append)  # again: nothing downloaded twice
    assert sum("already downloaded, md5 ok" in line for line in lines) == 2
    assert "already holds the Omniglot shards: kept" in lines[-1]  # nor built twice
    assert (tmp_path / "manifest.json").stat().st_mtime_ns == built
    # a build killed before its manifest (SIGKILL, the OOM killer: no handler removes its shards) is
    # done again, where `data build` would refuse the folder: the fetch is what a pod's init runs
    (tmp_path / "manifest.json").unlink()
    lines.clear()
    fetch_omniglot(tmp_path, url=mirror, md5=md5, progress=lines.append)
    assert any("removed 1 shard(s) of an earlier build that did not finish" in line for line in lines), lines
    assert len(ShardedDataset(tmp_path).classes) == 1623


def test_a_checksum_mismatch_keeps_nothing(mirror, tmp_path):
    # The zips in ../shared are repacked, so the official md5 does not match them: a real mismatch.
    with pytest.raises(
        DownloadError, match="downloaded with md5 [0-9a-f]{32}, expected 68d2efa1b9178cc56df9314c21c6e718"
    ):
        fetch_omniglot(tmp_path, url=mirror, progress=lambda line: None)
    assert list((tmp_path / "downloads").iterdir()) == []  # no partial or unverified file left behind


def test_offline_fetch_says_how_to_build_from_a_local_copy(tmp_path, capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    assert main(["data", "fetch", "omniglot", "--out", str(tmp_path), "--mirror", url]) == 2
    error = capsys.readouterr().err
    assert "could not download" in error and "images_background.zip" in error
    assert f"distmeta data build omniglot --src DIR --out {tmp_path}" in error


def test_a_missing_file_on_the_mirror_is_named(mirror, tmp_path):
    with pytest.raises(DownloadError, match=r"answered HTTP 404 .*is the URL right\? Build from a local copy"):
        fetch_omniglot(tmp_path, url=f"{mirror}/nothing", progress=lambda line: None)


class CutOffHandler(QuietHandler):
    """Promises 1,000 bytes, sends 10, closes the connection."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"0123456789")
        self.close_connection = True


def test_a_download_cut_short_is_named_and_nothing_is_kept(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), CutOffHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/images_background.zip"
    try:
        with pytest.raises(DownloadError, match="the connection ended after 10 of its 1,000 bytes; try again"):
            download(url, tmp_path / "a.zip", "0" * 32, "or build from a local copy", progress=lambda line: None)
    finally:
        server.shutdown()
    assert list(tmp_path.iterdir()) == []
