"""Tests for tp_jax.data: real-data facts, corrupt-input errors, local-mirror download, pipeline."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import shutil
import socket
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tp_jax import data

# The real files, found by the loader's own lookup at import (before tests scrub $TP_JAX_DATA);
# tests that read them use conftest's real_data_dir fixture, which fails under CI when absent.
REAL = data.resolve_data_dir()
needs_real = pytest.mark.usefixtures("real_data_dir")

MNIST_TEST = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def no_external_network(monkeypatch):
  """Refuse (and record) any connection or DNS lookup that is not loopback; scrub env."""
  attempts: list[str] = []
  real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
  local = {"127.0.0.1", "localhost", "::1"}

  def getaddrinfo(host, *args, **kwargs):
    host_s = host.decode() if isinstance(host, bytes) else str(host)
    if host_s not in local:
      attempts.append(host_s)
      raise socket.gaierror(f"test blocked DNS lookup of {host_s}")
    return real_getaddrinfo(host, *args, **kwargs)

  def connect(self, address):
    if isinstance(address, tuple) and address[0] not in local:
      attempts.append(str(address[0]))
      raise OSError(f"test blocked connection to {address}")
    return real_connect(self, address)

  monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
  monkeypatch.setattr(socket.socket, "connect", connect)
  # Proxies would route even 127.0.0.1 elsewhere; our env vars would leak between tests.
  for var in list(os.environ):
    if var.lower().endswith("_proxy") or var.startswith("TP_JAX_"):
      monkeypatch.delenv(var)
  yield attempts
  assert not attempts, f"test touched the network: {attempts}"


@pytest.fixture(scope="module")
def real(real_data_dir):
  """Cached loader for the real data (each split parsed once per module)."""
  return functools.cache(lambda name, split: data.load(name, split, REAL, download=False))


@pytest.fixture
def http_server():
  """Start local HTTP servers on 127.0.0.1, one per handler class; returns the base URL."""
  servers = []

  def start(handler) -> str:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    servers.append((srv, thread))
    return f"http://127.0.0.1:{srv.server_address[1]}/"

  yield start
  for srv, thread in servers:
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture
def serve(http_server):
  """Serve a directory; returns (base_url, list of requested paths)."""

  def start(root: Path):
    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):

      def log_message(self, fmt, *args):  # keep pytest output clean, but remember the hit
        requests.append(self.path)

    return http_server(functools.partial(Handler, directory=str(root))), requests

  return start


class _FaultyHandler(BaseHTTPRequestHandler):
  """Sends the first half of a real MNIST file, then closes ('length': with the full
  Content-Length; 'chunked': as one chunk announced whole) or stalls ('stall')."""

  fault = "length"

  def log_message(self, fmt, *args):
    pass

  def do_GET(self):
    body = (REAL / "mnist" / self.path.lstrip("/")).read_bytes()
    self.send_response(200)
    if self.fault == "chunked":
      self.send_header("Transfer-Encoding", "chunked")
      self.end_headers()
      self.wfile.write(f"{len(body):x}\r\n".encode() + body[: len(body) // 2])
    else:
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body[: len(body) // 2])
    self.wfile.flush()
    if self.fault == "stall":
      time.sleep(3 * data.DOWNLOAD_TIMEOUT_S)
    self.close_connection = True


@pytest.fixture
def mnist_copy(tmp_path, real_data_dir):
  """A data dir in tmp_path holding copies of the real MNIST test files; returns (root, dir)."""
  d = tmp_path / "data" / "mnist"
  d.mkdir(parents=True)
  for f in MNIST_TEST:
    shutil.copyfile(REAL / "mnist" / f, d / f)
  return tmp_path / "data", d


def _raw(path: Path) -> bytes:
  return gzip.decompress(path.read_bytes())


def _write_gz(path: Path, raw: bytes) -> None:
  path.write_bytes(gzip.compress(raw, compresslevel=1))


def _leftovers(root: Path) -> list[Path]:
  return [p for p in root.rglob("*") if p.name.endswith(".part")]


def _files(root: Path) -> list[str]:
  """Every file under `root` (hidden ones too), relative and sorted."""
  return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir())


def _pixel_stats(x_NHWC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Exact per-channel mean/std of pixel/255 via a 256-bin histogram (no float copy of the data)."""
  means, stds = [], []
  for c in range(x_NHWC.shape[-1]):
    hist = np.bincount(x_NHWC[..., c].ravel(), minlength=256).astype(np.float64)
    v = np.arange(256) / 255.0
    m = (hist * v).sum() / hist.sum()
    means.append(m)
    stds.append(np.sqrt((hist * (v - m) ** 2).sum() / hist.sum()))
  return np.array(means), np.array(stds)


# ----------------------------------------------------------------------------- real data

MNIST_TRAIN_HIST = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_HIST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

REAL_FACTS = [
    # name, split, n, first labels, histogram, mean (/255), std (/255) from PROVENANCE.md
    ("mnist", "train", 60000, [5, 0, 4, 1, 9, 2, 1, 3, 1, 4], MNIST_TRAIN_HIST, [0.1307], [0.3081]),
    ("mnist", "test", 10000, [7, 2, 1, 0, 4, 1, 4, 9, 5, 9], MNIST_TEST_HIST, [0.1325], [0.3105]),
    (
        "fashion_mnist",
        "train",
        60000,
        [9, 0, 0, 3, 0, 2, 7, 2, 5, 5],
        [6000] * 10,
        [0.2860],
        [0.3530],
    ),
    (
        "fashion_mnist",
        "test",
        10000,
        [9, 2, 1, 1, 6, 1, 4, 6, 5, 7],
        [1000] * 10,
        [0.2868],
        [0.3524],
    ),
    (
        "cifar10",
        "train",
        50000,
        [6, 9, 9, 4, 1, 1, 2, 7, 8, 3],
        [5000] * 10,
        [0.4914, 0.4822, 0.4465],
        [0.2470, 0.2435, 0.2616],
    ),
    (
        "cifar10",
        "test",
        10000,
        [3, 8, 8, 0, 6, 6, 1, 6, 3, 1],
        [1000] * 10,
        [0.4942, 0.4851, 0.4504],
        [0.2467, 0.2429, 0.2616],
    ),
]


@needs_real
@pytest.mark.parametrize("name,split,n,first,hist,mean,std", REAL_FACTS, ids=lambda v: str(v)[:12])
def test_real_data_matches_provenance(real, name, split, n, first, hist, mean, std):
  x, y = real(name, split)
  h, w, c = data.DATASETS[name].image_shape
  assert x.shape == (n, h, w, c) and x.dtype == np.uint8
  assert y.shape == (n,) and y.dtype == np.int32
  assert y[:10].tolist() == first
  assert np.bincount(y, minlength=10).tolist() == hist
  # Means are published to 4 decimals; a channel swap or transposition would be way off.
  got_mean, got_std = _pixel_stats(x)
  np.testing.assert_allclose(got_mean, mean, atol=6e-5)
  np.testing.assert_allclose(got_std, std, atol=6e-5)


@needs_real
def test_cifar_first_batch_histogram_and_registry_stats(real):
  x, y = real("cifar10", "train")
  # data_batch_1 comes first: its own histogram pins the file order.
  assert np.bincount(y[:10000], minlength=10).tolist() == [
      1005,
      974,
      1032,
      1016,
      999,
      937,
      1030,
      1001,
      1025,
      981,
  ]
  for name in data.DATASETS:  # registry normalisation constants are the train statistics
    m, s = _pixel_stats(real(name, "train")[0])
    np.testing.assert_allclose(m, data.DATASETS[name].mean, atol=6e-5)
    np.testing.assert_allclose(s, data.DATASETS[name].std, atol=6e-5)


@needs_real
def test_registry_checksums_match_shared_sha256sums():
  sums = {}
  for line in (REAL / "SHA256SUMS").read_text().splitlines():
    h, rel = line.split()
    sums[rel] = h
  for name, ds in data.DATASETS.items():
    for rel, h in ds.sha256.items():
      assert sums[f"{name}/{rel}"] == h, rel


@needs_real
def test_load_dataset_normalised_on_device(real):
  ds = data.load_dataset("mnist", REAL, download=False)
  assert isinstance(ds.x_train, jax.Array) and isinstance(ds.y_test, jax.Array)
  assert ds.x_train.dtype == jnp.float32 and ds.y_train.dtype == jnp.int32
  assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
  assert ds.info is data.DATASETS["mnist"]
  np.testing.assert_array_equal(np.asarray(ds.y_test), real("mnist", "test")[1])
  # Train statistics after normalisation: mean 0, std 1 (up to the 4-decimal constants).
  assert abs(float(ds.x_train.mean())) < 1e-3
  assert abs(float(ds.x_train.std()) - 1.0) < 1e-3


# ----------------------------------------------------------------------------- registry / paths


def test_unknown_dataset_and_split_list_valid_ones(tmp_path):
  with pytest.raises(
      data.DataError, match="unknown dataset 'mnits'.*cifar10, fashion_mnist, mnist"
  ):
    data.load("mnits", "train", tmp_path)
  with pytest.raises(ValueError, match="unknown dataset"):  # DataError is a ValueError
    data.info("imagenet")
  with pytest.raises(data.DataError, match="unknown split 'val'.*train, test"):
    data.load("mnist", "val", tmp_path)


def test_expected_paths_layout(tmp_path):
  assert data.expected_paths("mnist", "test", tmp_path) == [
      tmp_path / "mnist" / f for f in MNIST_TEST
  ]
  assert data.expected_paths("fashion_mnist", "train", tmp_path)[0] == (
      tmp_path / "fashion_mnist" / "train-images-idx3-ubyte.gz"
  )
  cifar = data.expected_paths("cifar10", "train", tmp_path)
  assert [p.name for p in cifar] == [f"data_batch_{i}.bin" for i in range(1, 6)]
  assert all(p.parent == tmp_path / "cifar10" / "cifar-10-batches-bin" for p in cifar)
  assert data.expected_paths("cifar10", "test", tmp_path) == [
      tmp_path / "cifar10" / "cifar-10-batches-bin" / "test_batch.bin"
  ]


def test_resolve_data_dir_precedence(tmp_path, monkeypatch):
  repo = tmp_path / "repo"
  repo.mkdir()
  monkeypatch.chdir(repo)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert data.resolve_data_dir() == tmp_path / "home" / ".cache" / "tp_jax" / "data"
  (tmp_path / "shared" / "data").mkdir(parents=True)
  assert data.resolve_data_dir() == repo / ".." / "shared" / "data"
  (repo / "data").mkdir()
  assert data.resolve_data_dir() == repo / "data"
  monkeypatch.setenv("TP_JAX_DATA", str(tmp_path / "env"))
  assert data.resolve_data_dir() == tmp_path / "env"
  assert data.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
  assert data.resolve_data_dir("rel").is_absolute()


def test_mirror_urls_precedence(monkeypatch):
  assert data.mirror_urls("mnist") == (
      "https://ossci-datasets.s3.amazonaws.com/mnist/",
      "https://storage.googleapis.com/cvdf-datasets/mnist/",
  )
  assert data.mirror_urls("cifar10") == ("https://www.cs.toronto.edu/~kriz/",)
  monkeypatch.setenv("TP_JAX_MIRROR_FASHION_MNIST", "http://a/x, http://b/")
  assert data.mirror_urls("fashion_mnist") == ("http://a/x/", "http://b/")
  assert data.mirror_urls("fashion_mnist", ["http://c"]) == ("http://c/",)


def test_sha256_file_rehashes_modified_file(tmp_path):
  p = tmp_path / "f"
  p.write_bytes(b"abc")
  assert data.sha256_file(p) == hashlib.sha256(b"abc").hexdigest()
  p.write_bytes(b"abd")  # same size; bump mtime explicitly in case of coarse timestamps
  st = p.stat()
  os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  assert data.sha256_file(p) == hashlib.sha256(b"abd").hexdigest()
  data.verify_file(p, hashlib.sha256(b"abd").hexdigest())
  with pytest.raises(data.DataError, match="sha256 mismatch"):
    data.verify_file(p, hashlib.sha256(b"abc").hexdigest())


# ----------------------------------------------------------------------------- bad input


def test_missing_files_without_download_lists_expected_paths(tmp_path):
  with pytest.raises(data.DataError) as e:
    data.load("cifar10", "train", tmp_path, download=False)
  msg = str(e.value)
  for p in data.expected_paths("cifar10", "train", tmp_path):
    assert str(p) in msg
  assert "TP_JAX_DATA" in msg and "TP_JAX_MIRROR_CIFAR10" in msg
  assert "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz" in msg
  assert "download=False" in msg


def test_missing_files_offline_names_paths_env_and_mirrors_tried(tmp_path, no_external_network):
  # Official mirrors, but the network guard refuses them: like a machine without network.
  with pytest.raises(data.DataError) as e:
    data.load("mnist", "test", tmp_path / "d")
  msg = str(e.value)
  for p in data.expected_paths("mnist", "test", tmp_path / "d"):
    assert str(p) in msg
  assert "TP_JAX_DATA" in msg and "download failed" in msg
  for base in data.DATASETS["mnist"].mirrors:
    assert base + MNIST_TEST[0] in msg
  assert set(no_external_network) == {"ossci-datasets.s3.amazonaws.com", "storage.googleapis.com"}
  no_external_network.clear()  # blocked as intended; nothing actually left the machine
  assert _leftovers(tmp_path) == [] and not list((tmp_path / "d" / "mnist").glob("*"))


def test_flipped_byte_is_a_checksum_mismatch(mnist_copy):
  root, d = mnist_copy
  p = d / MNIST_TEST[0]
  buf = bytearray(p.read_bytes())
  buf[len(buf) // 2] ^= 0x01
  p.write_bytes(bytes(buf))
  with pytest.raises(data.DataError) as e:
    data.load("mnist", "test", root, download=False)
  msg = str(e.value)
  assert str(p) in msg and "sha256 mismatch" in msg and "verify=False" in msg
  assert data.DATASETS["mnist"].sha256[MNIST_TEST[0]] in msg
  assert hashlib.sha256(bytes(buf)).hexdigest() in msg


def test_truncated_files(mnist_copy):
  root, d = mnist_copy
  img, lab = d / MNIST_TEST[0], d / MNIST_TEST[1]
  _write_gz(img, _raw(img)[:-100])  # valid gzip, short payload
  with pytest.raises(data.DataError, match="sha256 mismatch"):
    data.load("mnist", "test", root, download=False)
  with pytest.raises(data.DataError, match=r"t10k-images.*truncated: header says 10000 images"):
    data.load("mnist", "test", root, verify=False, download=False)
  lab.write_bytes(lab.read_bytes()[:-50])  # gzip stream cut off mid-way
  with pytest.raises(data.DataError, match=r"t10k-labels.*truncated or corrupt gzip"):
    data.parse_idx_labels(lab)
  (d / "empty.gz").write_bytes(gzip.compress(b"\x00\x00"))
  with pytest.raises(data.DataError, match="truncated idx file"):
    data.parse_idx_labels(d / "empty.gz")


@pytest.mark.parametrize("which,magic", [(0, 0x801), (1, 0x803), (1, 0x802)])
def test_wrong_magic_number(mnist_copy, which, magic):
  root, d = mnist_copy
  p = d / MNIST_TEST[which]
  raw = _raw(p)
  _write_gz(p, magic.to_bytes(4, "big") + raw[4:])
  with pytest.raises(data.DataError, match=rf"{MNIST_TEST[which]}: bad magic number 0x{magic:x}"):
    data.load("mnist", "test", root, verify=False, download=False)


def test_label_out_of_range_and_count_mismatch(mnist_copy):
  root, d = mnist_copy
  lab = d / MNIST_TEST[1]
  raw = bytearray(_raw(lab))
  raw[8 + 3] = 10
  _write_gz(lab, bytes(raw))
  with pytest.raises(
      data.DataError, match=r"t10k-labels.*label 10 out of range \[0, 10\) at index 3"
  ):
    data.load("mnist", "test", root, verify=False, download=False)
  raw[8 + 3] = 0
  _write_gz(lab, bytes(raw[:4]) + (9999).to_bytes(4, "big") + bytes(raw[8:-1]))  # one label short
  with pytest.raises(
      data.DataError, match="9999 labels but t10k-images-idx3-ubyte.gz has 10000 images"
  ):
    data.load("mnist", "test", root, verify=False, download=False)


def test_parse_idx_images_checks_dims(tmp_path):
  p = tmp_path / "x.gz"
  _write_gz(
      p,
      (0x803).to_bytes(4, "big")
      + b"".join(v.to_bytes(4, "big") for v in (2, 27, 28))
      + bytes(2 * 27 * 28),
  )
  with pytest.raises(data.DataError, match="image dims 27x28, expected 28x28"):
    data.parse_idx_images(p)
  body = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8)
  _write_gz(
      p,
      (0x803).to_bytes(4, "big")
      + b"".join(v.to_bytes(4, "big") for v in (2, 28, 28))
      + body.tobytes(),
  )
  x = data.parse_idx_images(p)
  assert x.shape == (2, 28, 28, 1) and x.dtype == np.uint8
  np.testing.assert_array_equal(x.ravel(), body)  # row-major pixels, images in file order
  _write_gz(
      p,
      (0x803).to_bytes(4, "big")
      + b"".join(v.to_bytes(4, "big") for v in (2, 28, 28))
      + body.tobytes()
      + b"!",
  )
  with pytest.raises(data.DataError, match="trailing bytes"):
    data.parse_idx_images(p)


def test_parse_cifar_batch_layout_and_errors(tmp_path):
  rng = np.random.default_rng(0)
  labels = np.array([3, 9], np.uint8)
  planes = rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)  # CHW per record
  rec = np.concatenate([labels[:, None], planes.reshape(2, -1)], axis=1)
  p = tmp_path / "b.bin"
  p.write_bytes(rec.tobytes())
  x, y = data.parse_cifar_batch(p)
  assert (
      x.shape == (2, 32, 32, 3)
      and x.dtype == np.uint8
      and y.tolist() == [3, 9]
      and y.dtype == np.int32
  )
  np.testing.assert_array_equal(x[1, :, :, 0], planes[1, 0])  # R plane -> channel 0
  np.testing.assert_array_equal(x[0, 5, :, 2], planes[0, 2, 5])  # B plane, row 5
  p.write_bytes(rec.tobytes()[:-7])
  with pytest.raises(
      data.DataError, match=r"b\.bin: truncated or malformed: size 6139 .* 3073-byte record"
  ):
    data.parse_cifar_batch(p)
  p.write_bytes(b"")
  with pytest.raises(data.DataError, match="size 0"):
    data.parse_cifar_batch(p)
  rec[1, 0] = 200
  p.write_bytes(rec.tobytes())
  with pytest.raises(data.DataError, match=r"b\.bin: label 200 out of range \[0, 10\) at index 1"):
    data.parse_cifar_batch(p)


# ----------------------------------------------------------------------------- download


@needs_real
def test_download_mnist_from_local_mirror_with_fallback(tmp_path, serve):
  mirror = tmp_path / "mirror" / "mnist"
  mirror.mkdir(parents=True)
  for f in data.DATASETS["mnist"].sha256:
    os.symlink(REAL / "mnist" / f, mirror / f)
  base, hits = serve(tmp_path / "mirror")
  dest = tmp_path / "data"
  # First mirror 404s on everything; the second is the good one.
  out = data.download("mnist", dest, mirrors=[base + "nothing-here/", base + "mnist"])
  assert out == dest / "mnist"
  for f, h in data.DATASETS["mnist"].sha256.items():
    assert (out / f).is_file() and not (out / f).is_symlink()
    assert hashlib.sha256((out / f).read_bytes()).hexdigest() == h
  assert any(h.startswith("/nothing-here/") for h in hits) and _leftovers(dest) == []
  assert _files(dest) == sorted(f"mnist/{f}" for f in data.DATASETS["mnist"].sha256)
  x, y = data.load("mnist", "test", dest, download=False)
  assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9] and x.shape == (10000, 28, 28, 1)
  n = len(hits)
  data.download("mnist", dest, mirrors=[base + "mnist/"])  # everything present: no requests
  assert len(hits) == n


@needs_real
def test_load_downloads_missing_files_via_env_mirror(tmp_path, serve, monkeypatch):
  mirror = tmp_path / "mirror"
  mirror.mkdir()
  for f in data.DATASETS["fashion_mnist"].sha256:
    os.symlink(REAL / "fashion_mnist" / f, mirror / f)
  base, hits = serve(mirror)
  monkeypatch.setenv("TP_JAX_MIRROR_FASHION_MNIST", base)
  monkeypatch.setenv("TP_JAX_DATA", str(tmp_path / "data"))
  x, y = data.load("fashion_mnist", "test")
  assert y[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7] and x.shape == (10000, 28, 28, 1)
  assert "/t10k-images-idx3-ubyte.gz" in hits


@needs_real
def test_corrupt_mirror_leaves_no_file_behind(tmp_path, serve):
  mirror = tmp_path / "mirror"
  mirror.mkdir()
  for f in MNIST_TEST:
    shutil.copyfile(REAL / "mnist" / f, mirror / f)
  bad = bytearray((mirror / MNIST_TEST[1]).read_bytes())
  bad[100] ^= 0xFF
  (mirror / MNIST_TEST[1]).write_bytes(bytes(bad))
  base, _ = serve(mirror)
  dest = tmp_path / "data"
  with pytest.raises(data.DataError) as e:
    data.download("mnist", dest, mirrors=[base])
  msg = str(e.value)
  assert "sha256 mismatch" in msg and base + MNIST_TEST[1] in msg
  assert base + "train-images-idx3-ubyte.gz" in msg  # 404s are reported too
  assert (dest / "mnist" / MNIST_TEST[0]).is_file()  # the good file landed, verified
  assert not (dest / "mnist" / MNIST_TEST[1]).exists()
  assert _leftovers(tmp_path) == [] and _files(dest) == [f"mnist/{MNIST_TEST[0]}"]
  # Through `load` the same failure becomes the "files not found" error with the cause attached.
  with pytest.raises(data.DataError, match=r"(?s)data files not found.*sha256 mismatch"):
    data.load("mnist", "test", dest, mirrors=[base])


@needs_real
@pytest.mark.parametrize(
    "fault,expect",
    [("length", "transfer cut short"), ("chunked", "IncompleteRead"), ("stall", "timed out")],
)
def test_cut_short_or_stalled_transfer_leaves_nothing_and_next_mirror_is_tried(
    tmp_path, serve, http_server, monkeypatch, fault, expect
):
  monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT_S", 0.5)
  bad = http_server(type("Handler", (_FaultyHandler,), {"fault": fault}))
  dest = tmp_path / "data"
  with pytest.raises(data.DataError, match=expect) as e:
    data.download("mnist", dest, mirrors=[bad])
  for f in data.DATASETS["mnist"].sha256:
    assert f"{bad}{f}: " in str(e.value)
  assert _files(tmp_path) == []  # no partial file, whatever its name
  good, _ = serve(REAL / "mnist")
  data.download("mnist", dest, mirrors=[bad, good])
  assert sorted(p.name for p in (dest / "mnist").iterdir()) == sorted(data.DATASETS["mnist"].sha256)
  for f, h in data.DATASETS["mnist"].sha256.items():
    assert hashlib.sha256((dest / "mnist" / f).read_bytes()).hexdigest() == h


@needs_real
def test_download_cifar_archive_from_local_mirror(tmp_path, serve):
  mirror = tmp_path / "mirror"
  mirror.mkdir()
  # compresslevel 0: still a real gzip stream, but 185 MB in well under a second.
  with tarfile.open(mirror / "cifar-10-binary.tar.gz", "w:gz", compresslevel=0) as tar:
    tar.add(REAL / "cifar10" / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
  base, _ = serve(mirror)
  dest = tmp_path / "data"
  root = data.download("cifar10", dest, mirrors=[base])
  for rel in data.DATASETS["cifar10"].sha256:
    assert (root / rel).is_file()
  assert _leftovers(tmp_path) == [] and not list(root.glob("*.tar.gz"))
  assert _files(dest) == sorted(f"cifar10/{rel}" for rel in data.DATASETS["cifar10"].sha256)
  x, y = data.load("cifar10", "test", dest, download=False)  # verify=True re-checks the sha256
  assert y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1] and x.shape == (10000, 32, 32, 3)


def _tar_add(tar, name, payload=b"x", **kw):
  ti = tarfile.TarInfo(name)
  for k, v in kw.items():
    setattr(ti, k, v)
  ti.size = 0 if kw.get("type") == tarfile.SYMTYPE else len(payload)
  tar.addfile(ti, None if ti.size == 0 else io.BytesIO(payload))


@pytest.mark.parametrize(
    "bad_test_batch,expect", [(False, "archive lacks"), (True, "sha256 mismatch")]
)
def test_cifar_archive_traversal_links_and_bad_members(tmp_path, serve, bad_test_batch, expect):
  mirror = tmp_path / "mirror"
  mirror.mkdir()
  with tarfile.open(mirror / "cifar-10-binary.tar.gz", "w:gz") as tar:
    _tar_add(tar, "../escape1.txt")
    _tar_add(tar, "cifar-10-batches-bin/../../escape2.txt")
    _tar_add(tar, str(tmp_path / "escape3.txt"))
    _tar_add(
        tar, "cifar-10-batches-bin/data_batch_1.bin", type=tarfile.SYMTYPE, linkname="/etc/passwd"
    )
    if bad_test_batch:
      _tar_add(tar, "cifar-10-batches-bin/test_batch.bin", bytes(3073))
  base, _ = serve(mirror)
  dest = tmp_path / "a" / "b" / "data"
  with pytest.raises(data.DataError, match=expect) as e:
    data.download("cifar10", dest, mirrors=[base])
  assert base + "cifar-10-binary.tar.gz" in str(e.value)
  assert (
      not [p for p in tmp_path.rglob("escape*")] and not (tmp_path / "a" / "escape1.txt").exists()
  )
  assert [p for p in (dest / "cifar10").rglob("*") if not p.is_dir()] == []
  assert _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- pipeline


def test_normalise_per_channel():
  x = np.array([0, 51, 255], np.uint8).reshape(1, 1, 3, 1) * np.ones((1, 1, 1, 3), np.uint8)
  out = data.normalise(x, "cifar10")
  assert out.dtype == jnp.float32 and out.shape == x.shape
  mean, std = np.array(data.DATASETS["cifar10"].mean), np.array(data.DATASETS["cifar10"].std)
  np.testing.assert_allclose(np.asarray(out), (x / 255.0 - mean) / std, rtol=1e-6)
  assert abs(float(data.normalise(np.full((1, 1, 1, 1), 0.1307 * 255), "mnist").squeeze())) < 1e-6
  with pytest.raises(data.DataError):
    data.normalise(x, "svhn")


def test_epoch_permutation():
  k1, k2 = jax.random.key(0), jax.random.key(1)
  p = np.asarray(data.epoch_permutation(k1, 100))
  assert sorted(p.tolist()) == list(range(100))
  np.testing.assert_array_equal(p, np.asarray(data.epoch_permutation(k1, 100)))
  assert not np.array_equal(p, np.asarray(data.epoch_permutation(k2, 100)))
  assert not np.array_equal(p, np.arange(100))


def test_batches_cover_a_permutation_without_repeats():
  idx = np.asarray(data.batches(jax.random.key(3), 103, 10))
  assert idx.shape == (10, 10)
  flat = idx.ravel().tolist()
  assert len(set(flat)) == 100 and set(flat) <= set(range(103))  # 3 dropped, none repeated
  jitted = jax.jit(data.batches, static_argnums=(1, 2))(jax.random.key(3), 103, 10)
  np.testing.assert_array_equal(np.asarray(jitted), idx)
  assert np.asarray(data.batches(jax.random.key(0), 8, 8)).shape == (1, 8)
  for bad in (0, 104):
    with pytest.raises(ValueError, match="batch_size"):
      data.batches(jax.random.key(0), 103, bad)


def _matching_windows(out_HWC, x_HWC, pad):
  """All (dy, dx, flipped) whose crop of the edge-padded image equals out_HWC."""
  h, w, _ = x_HWC.shape
  padded = np.pad(x_HWC, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
  hits = []
  for dy in range(2 * pad + 1):
    for dx in range(2 * pad + 1):
      win = padded[dy : dy + h, dx : dx + w]
      hits += [
          (dy, dx, f)
          for f, cand in ((False, win), (True, win[:, ::-1]))
          if np.array_equal(cand, out_HWC)
      ]
  return hits


def test_augment_crops_and_flips_validly():
  x = (
      np.random.default_rng(0).uniform(1.0, 2.0, (32, 12, 10, 3)).astype(np.float32)
  )  # distinct values
  key = jax.random.key(42)
  out = data.augment(key, x)  # augment is itself jitted, so this also proves it traces
  assert out.shape == x.shape and out.dtype == x.dtype
  np.testing.assert_array_equal(np.asarray(out), np.asarray(data.augment(key, x)))
  assert not np.array_equal(np.asarray(out), np.asarray(data.augment(jax.random.key(43), x)))
  xs, outs = np.asarray(x), np.asarray(out)
  found = []
  for i in range(len(xs)):
    hits = _matching_windows(outs[i], xs[i], 4)
    assert hits, f"example {i} is not a (flipped) crop of its padded input"
    found += hits
  # Per-example randomness: several offsets and both flip states occur across the batch.
  assert len({(dy, dx) for dy, dx, _ in found}) > 5
  assert {f for _, _, f in found} == {False, True}
  # pad=0 leaves only flips.
  out0 = np.asarray(data.augment(key, x, pad=0))
  assert all(np.array_equal(o, xi) or np.array_equal(o, xi[:, ::-1]) for o, xi in zip(out0, xs))


# ----------------------------------------------------------------------------- TFDS backend


@pytest.fixture(scope="module")
def tfds_root(tmp_path_factory, real_data_dir):
  """TFDS's prepared-records dir, shared by the module (preparing MNIST takes ~20 s)."""
  pytest.importorskip("tensorflow_datasets", reason="the tfds extra is not installed")
  return tmp_path_factory.mktemp("tfds")


def _as_sorted_records(x: np.ndarray, y: np.ndarray) -> list[bytes]:
  """Order-free view of a split: TFDS stores the examples in its own order."""
  return sorted(img.tobytes() + bytes([lab]) for img, lab in zip(x, y))


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_tfds_backend_reads_the_same_examples_offline(real, tfds_root, name):
  for split in data.SPLITS:
    x, y = data.load_tfds(name, split, REAL, download=False, tfds_data_dir=tfds_root)
    x_ref, y_ref = real(name, split)
    assert x.dtype == np.uint8 and y.dtype == np.int32 and x.shape == x_ref.shape
    assert _as_sorted_records(x, y) == _as_sorted_records(x_ref, y_ref)


def test_load_dataset_tfds_backend(tfds_root, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_root))
  native = data.load_dataset("mnist", REAL, download=False)
  via_tfds = data.load_dataset("mnist", REAL, download=False, backend="tfds")
  # TFDS's own order, so the arrays really came through TFDS, not the native reader.
  assert not np.array_equal(np.asarray(native.y_train), np.asarray(via_tfds.y_train))
  for a, b in ((native.x_test, via_tfds.x_test), (native.y_train, via_tfds.y_train)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(np.sort(np.asarray(a).ravel()), np.sort(np.asarray(b).ravel()))


def test_tfds_backend_refuses_missing_and_corrupt_files(tmp_path, tfds_root):
  d = tmp_path / "data" / "fashion_mnist"
  d.mkdir(parents=True)
  for f in data.tfds_manual_files("fashion_mnist")[1:]:
    shutil.copyfile(REAL / "fashion_mnist" / f, d / f)
  missing = data.tfds_manual_files("fashion_mnist")[0]
  with pytest.raises(data.DataError, match=f"missing.*{missing}"):
    data.load_tfds(
        "fashion_mnist", "test", tmp_path / "data", download=False, tfds_data_dir=tmp_path / "tfds"
    )
  raw = bytearray(gzip.decompress((REAL / "fashion_mnist" / missing).read_bytes()))
  raw[100] ^= 0xFF
  _write_gz(d / missing, bytes(raw))
  with pytest.raises(data.DataError, match="does not match TFDS's registered sha256"):
    data.load_tfds(
        "fashion_mnist", "test", tmp_path / "data", download=False, tfds_data_dir=tmp_path / "tfds"
    )


def test_tfds_backend_cifar_needs_the_official_tarball(tmp_path, tfds_root):
  (tmp_path / "cifar10").symlink_to(REAL / "cifar10")  # extracted batches, no tarball
  with pytest.raises(data.DataError, match="cifar-10-binary.tar.gz"):
    data.load_tfds("cifar10", "train", tmp_path, download=False, tfds_data_dir=tfds_root)


def test_tfds_backend_without_tfds_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now fails
  with pytest.raises(data.DataError, match=r"pip install 'tp-jax\[tfds\]'"):
    data.load_tfds("mnist", "test")


def test_load_dataset_unknown_backend():
  with pytest.raises(data.DataError, match="unknown data backend 'hdf5'"):
    data.load_dataset("mnist", backend="hdf5")
