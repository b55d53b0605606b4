"""Released checkpoints by name: scripts/download.py against a loopback HTTP server, and names in entry scripts.

The server (127.0.0.1, a thread) serves generated files at /files/<name> (honouring Range), /plain/<name>
(ignoring it) and /hf/<name> (a redirect carrying the file's SHA-256 in X-Linked-Etag, as Hugging Face
answers), and records every request. The catalogue's addresses are pointed at it; nothing leaves the machine.
The RQ-VAE archive served is the official tiny pair of tests/data/rqvae/ packed as the releases are.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from common.errors import WeightsError
from common.losses import VGG16_FILENAME
from common.metrics import find_inception_weights
from common.metrics.inception import INCEPTION_FILE
from common.releases import RELEASES
from common.weights import find_weights, resolve_checkpoint
from scripts import download, reconstruct, sample
from tests.helpers import DATA, refused_in_process

ISSUE_NAMES = ("rqvae-ffhq", "rqtransformer-in256-1400M", "llamagen-vq16", "npp-gpt-b", "openmagvit2-256", "mar-base",
               "kl16", "inception", "vgg16", "lpips")
BODY = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
BODY_SHA256 = hashlib.sha256(BODY).hexdigest()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Range")))
        route, _, name = self.path.lstrip("/").partition("/")
        if route == "hf":
            self.send_response(302)
            self.send_header("Location", f"/files/{name}")
            self.send_header("X-Linked-Etag", f'"{self.server.etags[name]}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.server.files.get(name)
        if body is None:
            self.send_error(404)
            return
        start = int(self.headers["Range"][len("bytes="):-1]) if route == "files" and self.headers["Range"] else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.etags, httpd.requests = {"kl16.ckpt": BODY, "vq_ds16_c2i.pt": BODY}, {}, []
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:  # as released: one top folder, stage1/ and stage2/
        for stage in ("stage1", "stage2"):
            tar.add(os.path.join(DATA, "rqvae", stage), arcname=f"ffhq/{stage}")
    httpd.files["ffhq.tar.gz"] = buffer.getvalue()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def site(server, tmp_path, monkeypatch):
    """The server with a fresh request log; downloads land in this test's own cache folders."""
    monkeypatch.setenv("ARGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    server.requests.clear()
    return server


def publish(monkeypatch, site, name: str, route: str, **changes) -> None:
    """Point every file of the release `name` at the loopback server's `route`."""
    release = RELEASES[name]
    files = tuple(replace(f, url=f"{site.base}/{route}/{f.name}", **changes) for f in release.files)
    monkeypatch.setitem(RELEASES, name, replace(release, files=files))


def last_error_line(capsys, argv: list[str]) -> str:
    """The last stderr line of a download that must fail with a user's error (progress bars may precede it)."""
    with pytest.raises(SystemExit) as stop:
        download.main(argv)
    assert stop.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert "Traceback" not in "\n".join(lines)
    return lines[-1]


def test_a_release_is_fetched_checked_and_found_by_its_name(site, monkeypatch, tmp_path):
    publish(monkeypatch, site, "kl16", "files", sha256=BODY_SHA256)
    [path] = download.main(["kl16"])
    assert path == str(tmp_path / "cache" / "checkpoints" / "kl16" / "kl16.ckpt")
    assert open(path, "rb").read() == BODY and not os.path.exists(path + ".part")
    assert resolve_checkpoint("kl16").path == path
    download.main(["kl16"])  # already there: not fetched again
    assert len(site.requests) == 1


def test_a_partial_download_resumes_with_a_range_request(site, monkeypatch, tmp_path):
    publish(monkeypatch, site, "kl16", "files", sha256=BODY_SHA256)
    folder = tmp_path / "cache" / "checkpoints" / "kl16"
    folder.mkdir(parents=True)
    (folder / "kl16.ckpt.part").write_bytes(BODY[:123_456])
    [path] = download.main(["kl16"])
    assert site.requests == [("/files/kl16.ckpt", "bytes=123456-")]
    assert open(path, "rb").read() == BODY


def test_a_server_that_ignores_the_range_gets_the_file_again_from_the_start(site, monkeypatch, tmp_path):
    publish(monkeypatch, site, "kl16", "plain", sha256=BODY_SHA256)
    folder = tmp_path / "elsewhere" / "kl16"
    folder.mkdir(parents=True)
    (folder / "kl16.ckpt.part").write_bytes(b"stale bytes of another attempt")
    [path] = download.main(["kl16", "--dir", str(tmp_path / "elsewhere")])
    assert site.requests[0][1] == "bytes=30-"
    assert path == str(folder / "kl16.ckpt") and open(path, "rb").read() == BODY


def test_a_wrong_checksum_is_refused_and_the_download_removed(site, monkeypatch, tmp_path, capsys):
    publish(monkeypatch, site, "kl16", "files", sha256="0" * 64)
    line = last_error_line(capsys, ["kl16"])
    assert line.startswith("WeightsError:") and "does not match the published" in line and "removed" in line
    assert os.listdir(tmp_path / "cache" / "checkpoints" / "kl16") == []


@pytest.mark.parametrize("published", ["right", "wrong"])
def test_the_sha256_a_host_publishes_in_its_redirect_is_checked(site, monkeypatch, capsys, published):
    publish(monkeypatch, site, "llamagen-vq16", "hf")
    site.etags["vq_ds16_c2i.pt"] = BODY_SHA256 if published == "right" else "f" * 64
    if published == "right":
        [path] = download.main(["llamagen-vq16"])
        assert open(path, "rb").read() == BODY and "SHA-256 checked" in capsys.readouterr().out
    else:
        assert "does not match the published " + "f" * 64 in last_error_line(capsys, ["llamagen-vq16"])


def test_hub_weights_land_in_torch_hub_cache_where_lpips_finds_them(site, monkeypatch, tmp_path):
    site.files[VGG16_FILENAME] = BODY
    publish(monkeypatch, site, "lpips", "files", sha256=BODY_SHA256[:8])  # a prefix, as the file name carries one
    [path] = download.main(["lpips"])
    assert path == str(tmp_path / "torch" / "hub" / "checkpoints" / VGG16_FILENAME)
    assert find_weights(VGG16_FILENAME, None, "url", "--vgg-weights") == path
    assert find_weights(VGG16_FILENAME, "vgg16", "url", "--vgg-weights") == path


def test_unknown_names_and_network_failures_end_in_one_line(site, monkeypatch, capsys):
    line = refused_in_process(capsys, download.main, ["rqvae-ffhq", "nope"])
    assert line.startswith("ConfigError: nope: not a released checkpoint") and "rqvae-ffhq, rqtransformer-ffhq" in line
    publish(monkeypatch, site, "mar-base", "files")  # the server has no checkpoint-last.pth: 404
    line = refused_in_process(capsys, download.main, ["mar-base"])
    assert "HTTP 404" in line and "/files/checkpoint-last.pth" in line


def test_an_archive_is_unpacked_where_the_loaders_read_it_and_entry_scripts_take_the_names(site, monkeypatch,
                                                                                         tmp_path):
    for name in ("rqvae-ffhq", "rqtransformer-ffhq"):
        publish(monkeypatch, site, name, "files")
    stage1, stage2 = download.main(["rqvae-ffhq", "rqtransformer-ffhq"])
    folder = tmp_path / "cache" / "checkpoints" / "rq-ffhq"
    assert (stage1, stage2) == (str(folder / "stage1" / "model.pt"), str(folder / "stage2" / "model.pt"))
    assert sorted(os.listdir(folder)) == ["stage1", "stage2"] and (folder / "stage1" / "config.yaml").is_file()
    assert len(site.requests) == 1  # one archive for both names

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((16, 16, 3), 90, dtype=np.uint8)).save(images / "a.png")
    reconstruct.main(["--ckpt", "rqvae-ffhq", "--input", str(images), "--output", str(tmp_path / "recon"),
                      "--device", "cpu"])
    sample.main(["-v", "rqvae-ffhq", "-a", "rqtransformer-ffhq", "-n", "1", "--output", str(tmp_path / "samples"),
                 "--device", "cpu"])
    assert (tmp_path / "recon" / "a.png").is_file() and (tmp_path / "samples" / "00000.png").is_file()


def test_a_name_not_downloaded_says_which_command_fetches_it(site, tmp_path, capsys):
    line = refused_in_process(capsys, sample.main, ["-v", "rqvae-ffhq", "-a", "rqtransformer-ffhq", "--output",
                                                    str(tmp_path / "samples")])
    assert line.startswith("WeightsError: rqvae-ffhq: a released checkpoint that is not downloaded yet")
    assert line.endswith("fetch it with python scripts/download.py rqvae-ffhq")
    with pytest.raises(WeightsError, match="python scripts/download.py inception$"):
        find_inception_weights("inception")
    with pytest.raises(WeightsError, match=f"put it at .*{INCEPTION_FILE}; python scripts/download.py inception"):
        find_inception_weights(None)
    missing = str(tmp_path / "pretrained_models" / "vq_ds16_c2i.pt")
    with pytest.raises(WeightsError, match="released as llamagen-vq16: fetch it with python scripts/download.py "
                                           "llamagen-vq16"):
        resolve_checkpoint(missing)
    assert not site.requests and not (tmp_path / "samples").exists()


def test_the_catalogue_holds_every_release_the_issue_names_laid_out_as_the_loaders_read_them(capsys):
    assert set(ISSUE_NAMES) <= set(RELEASES)
    assert all(f.url.startswith("https://") for release in RELEASES.values() for f in release.files)
    assert [RELEASES[name].target for name in ("inception", "vgg16", "lpips")] == [INCEPTION_FILE] + 2 * [
        VGG16_FILENAME]
    assert RELEASES["openmagvit2-256"].config == "imagenet_lfqgan_256_L.yaml"
    download.main(["--list"])
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(RELEASES)
