"""Datasets: registry, checksummed loading and download, and a pure-JAX input pipeline.

Host side (numpy): `load` reads the original MNIST / Fashion-MNIST idx.gz files and the
CIFAR-10 binary batches, verified against built-in sha256 sums, into uint8 NHWC images and
int32 labels. Device side (jax): `normalise`, `batches`, `augment` are pure and jit-able, and
`load_dataset` returns normalised arrays already on device, so the training loop never touches
numpy.

Backends: 'native' (the readers here) and 'tfds' (`load_tfds`: the same official files read
through tensorflow_datasets' builders, for users who prefer TFDS; `pip install 'tp-jax[tfds]'`).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import types
import urllib.request
import zlib
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DATA_ENV = "TP_JAX_DATA"
MIRROR_ENV_PREFIX = "TP_JAX_MIRROR_"  # + dataset name upper-cased, e.g. TP_JAX_MIRROR_CIFAR10
SPLITS = ("train", "test")
DOWNLOAD_TIMEOUT_S = 60.0


class DataError(ValueError):
  """A dataset file is missing, corrupt, or malformed; the message names file and problem."""


class DatasetInfo(NamedTuple):
  """Static description of one dataset (read-only; lives in `DATASETS`)."""

  name: str
  files: Mapping[str, tuple[str, ...]]  # split -> paths relative to <data_dir>/<name>/
  sha256: Mapping[str, str]  # relative path -> official sha256
  image_shape: tuple[int, int, int]  # H, W, C
  num_classes: int
  num_examples: Mapping[str, int]  # split -> count (documentation / sanity checks)
  mean: tuple[float, ...]  # per channel, on pixel/255
  std: tuple[float, ...]
  mirrors: tuple[str, ...]  # base URLs, tried in order
  archive: str | None  # file under a mirror base holding all files (CIFAR), else None


def _ro(d: dict) -> Mapping:
  return types.MappingProxyType(d)


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_CIFAR_DIR = "cifar-10-batches-bin"


def _idx_dataset(
    name: str,
    *,
    train_images: str,
    train_labels: str,
    test_images: str,
    test_labels: str,
    mean: float,
    std: float,
    mirrors: tuple[str, ...],
) -> DatasetInfo:
  """An MNIST-format dataset: the four official gzipped IDX files, given by their sha256s."""
  digests = (train_images, train_labels, test_images, test_labels)
  return DatasetInfo(
      name=name,
      files=_ro(_IDX_FILES),
      sha256=_ro(dict(zip(_IDX_FILES["train"] + _IDX_FILES["test"], digests))),
      image_shape=(28, 28, 1),
      num_classes=10,
      num_examples=_ro({"train": 60000, "test": 10000}),
      mean=(mean,),
      std=(std,),
      mirrors=mirrors,
      archive=None,
  )


DATASETS: Mapping[str, DatasetInfo] = _ro(
    {
        "mnist": _idx_dataset(
            "mnist",
            train_images="440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            train_labels="3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            test_images="8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            test_labels="f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            mean=0.1307,
            std=0.3081,
            mirrors=(
                "https://ossci-datasets.s3.amazonaws.com/mnist/",
                "https://storage.googleapis.com/cvdf-datasets/mnist/",
            ),
        ),
        "fashion_mnist": _idx_dataset(
            "fashion_mnist",
            train_images="3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            train_labels="a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            test_images="346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            test_labels="67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            mean=0.2860,
            std=0.3530,
            mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        ),
        "cifar10": DatasetInfo(
            name="cifar10",
            files=_ro(
                {
                    "train": tuple(f"{_CIFAR_DIR}/data_batch_{i}.bin" for i in range(1, 6)),
                    "test": (f"{_CIFAR_DIR}/test_batch.bin",),
                }
            ),
            sha256=_ro(
                {
                    f"{_CIFAR_DIR}/data_batch_1.bin": "cee916563c9f80d84e3cc88e17fdc0941787f1244f00a67874d45b261883ada5",
                    f"{_CIFAR_DIR}/data_batch_2.bin": "a591ca11fa1708a91ee40f54b3da4784ccd871ecf2137de63f51ada8b3fa57ed",
                    f"{_CIFAR_DIR}/data_batch_3.bin": "bbe8596564c0f86427f876058170b84dac6670ddf06d79402899d93ceea26f67",
                    f"{_CIFAR_DIR}/data_batch_4.bin": "014e562d6e23c72197cc727519169a60359f5eccd8945ad5a09d710285ff4e48",
                    f"{_CIFAR_DIR}/data_batch_5.bin": "755304fc0b379caeae8c14f0dac912fbc7d6cd469eb67a1029a08a39453a9add",
                    f"{_CIFAR_DIR}/test_batch.bin": "8e2eb146ae340b09e24670f29cabc6326dba54da8789dab6768acf480273f65b",
                }
            ),
            image_shape=(32, 32, 3),
            num_classes=10,
            num_examples=_ro({"train": 50000, "test": 10000}),
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            mirrors=("https://www.cs.toronto.edu/~kriz/",),
            archive="cifar-10-binary.tar.gz",
        ),
    }
)

_CIFAR_RECORD_BYTES = 1 + 32 * 32 * 3
_IDX_IMAGES_MAGIC = 0x803  # ubyte, 3 dims
_IDX_LABELS_MAGIC = 0x801  # ubyte, 1 dim


# ----------------------------------------------------------------------------- registry


def info(name: str) -> DatasetInfo:
  """Registry entry for `name`; unknown names raise DataError listing the valid ones."""
  try:
    return DATASETS[name]
  except KeyError:
    raise DataError(
        f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}"
    ) from None


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
  """Data root: argument, else $TP_JAX_DATA, else ./data or ../shared/data, else ~/.cache."""
  if data_dir is not None:
    return Path(data_dir).expanduser().absolute()
  env = os.environ.get(DATA_ENV)
  if env:
    return Path(env).expanduser().absolute()
  # Relative to the cwd, because that is where the files sit on dev and CI checkouts.
  for candidate in (Path("data"), Path("..") / "shared" / "data"):
    if candidate.is_dir():
      return candidate.absolute()
  return (Path.home() / ".cache" / "tp_jax" / "data").absolute()


def mirror_urls(name: str, mirrors: Sequence[str] | None = None) -> tuple[str, ...]:
  """Mirror base URLs: argument, else $TP_JAX_MIRROR_<NAME> (comma separated), else official."""
  ds = info(name)
  if mirrors is None:
    env = os.environ.get(MIRROR_ENV_PREFIX + name.upper(), "")
    mirrors = [m.strip() for m in env.split(",") if m.strip()] or ds.mirrors
  # Bases are joined by plain concatenation, so make sure each ends in a slash.
  return tuple(m if m.endswith("/") else m + "/" for m in mirrors)


def expected_paths(name: str, split: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
  """Absolute paths of the files `load(name, split)` reads."""
  ds = info(name)
  if split not in ds.files:
    raise DataError(f"unknown split {split!r} for {name}; valid splits: {', '.join(ds.files)}")
  root = resolve_data_dir(data_dir) / name
  return [root / rel for rel in ds.files[split]]


# ----------------------------------------------------------------------------- checksums


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
  # Keyed on (size, mtime) so an edited file is re-hashed; only ever a cache, never a truth.
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
  """Hex sha256 of a file (memoised per path, size and mtime within this process)."""
  st = os.stat(path)
  return _sha256_cached(str(Path(path).absolute()), st.st_size, st.st_mtime_ns)


def verify_file(path: str | os.PathLike, expected: str) -> None:
  """Raise DataError naming the file and both hashes if its sha256 is not `expected`."""
  actual = sha256_file(path)
  if actual != expected:
    raise DataError(
        f"{path}: sha256 mismatch (expected {expected}, actual {actual}); the file is corrupt "
        f"or a different version. Delete it to re-download, or pass verify=False to skip the check."
    )


# ----------------------------------------------------------------------------- parsing


def _read_idx(path: Path) -> tuple[int, tuple[int, ...], bytes]:
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
    raise DataError(f"{path}: truncated or corrupt gzip stream ({e})") from e
  if len(raw) < 4:
    raise DataError(f"{path}: truncated idx file ({len(raw)} bytes, no header)")
  magic = int.from_bytes(raw[:4], "big")
  ndim = magic & 0xFF
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(f"{path}: truncated idx header ({len(raw)} bytes, need {header})")
  dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  return magic, dims, raw[header:]


def parse_idx_images(
    path: str | os.PathLike, image_shape: tuple[int, int, int] = (28, 28, 1)
) -> np.ndarray:
  """Images from an idx3-ubyte .gz file as uint8 [N, H, W, 1]."""
  path = Path(path)
  magic, dims, body = _read_idx(path)
  if magic != _IDX_IMAGES_MAGIC:
    raise DataError(
        f"{path}: bad magic number 0x{magic:x}, expected 0x{_IDX_IMAGES_MAGIC:x} (idx3 ubyte images)"
    )
  n, h, w = dims
  if (h, w) != image_shape[:2]:
    raise DataError(f"{path}: image dims {h}x{w}, expected {image_shape[0]}x{image_shape[1]}")
  if len(body) != n * h * w:
    what = "truncated" if len(body) < n * h * w else "trailing bytes"
    raise DataError(
        f"{path}: {what}: header says {n} images = {n * h * w} bytes, file has {len(body)}"
    )
  return np.frombuffer(body, np.uint8).reshape(n, h, w, 1)


def parse_idx_labels(path: str | os.PathLike, num_classes: int = 10) -> np.ndarray:
  """Labels from an idx1-ubyte .gz file as int32 [N], checked to lie in [0, num_classes)."""
  path = Path(path)
  magic, dims, body = _read_idx(path)
  if magic != _IDX_LABELS_MAGIC:
    raise DataError(
        f"{path}: bad magic number 0x{magic:x}, expected 0x{_IDX_LABELS_MAGIC:x} (idx1 ubyte labels)"
    )
  (n,) = dims
  if len(body) != n:
    what = "truncated" if len(body) < n else "trailing bytes"
    raise DataError(f"{path}: {what}: header says {n} labels, file has {len(body)} bytes")
  labels = np.frombuffer(body, np.uint8).astype(np.int32)
  _check_labels(path, labels, num_classes)
  return labels


def parse_cifar_batch(
    path: str | os.PathLike, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
  """CIFAR-10 binary batch (<label><1024 R><1024 G><1024 B> records) as uint8 NHWC, int32 labels."""
  path = Path(path)
  raw = path.read_bytes()
  if len(raw) == 0 or len(raw) % _CIFAR_RECORD_BYTES:
    raise DataError(
        f"{path}: truncated or malformed: size {len(raw)} is not a positive multiple of the "
        f"{_CIFAR_RECORD_BYTES}-byte record"
    )
  rec = np.frombuffer(raw, np.uint8).reshape(-1, _CIFAR_RECORD_BYTES)
  labels = rec[:, 0].astype(np.int32)
  _check_labels(path, labels, num_classes)
  # Stored planar (CHW); transpose once on the host so everything downstream is NHWC.
  images = np.ascontiguousarray(rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
  return images, labels


def _check_labels(path: Path, labels: np.ndarray, num_classes: int) -> None:
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    i = int(bad[0])
    raise DataError(
        f"{path}: label {labels[i]} out of range [0, {num_classes}) at index {i} ({bad.size} bad labels)"
    )


# ----------------------------------------------------------------------------- download


def _fetch(url: str, dest_dir: Path, expected_sha256: str | None) -> Path:
  """Stream `url` into a temp file in `dest_dir` (same filesystem, so os.replace is atomic later)."""
  fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".download-", suffix=".part")
  try:
    h = hashlib.sha256()
    with (
        os.fdopen(fd, "wb") as out,
        urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp,
    ):
      for chunk in iter(lambda: resp.read(1 << 20), b""):
        h.update(chunk)
        out.write(chunk)
      # read(n) returns b"" when the server closes early: what is left of Content-Length says so.
      if resp.length:
        raise DataError(f"transfer cut short: {resp.length} announced bytes never arrived")
    if expected_sha256 is not None and h.hexdigest() != expected_sha256:
      raise DataError(f"sha256 mismatch (expected {expected_sha256}, actual {h.hexdigest()})")
    return Path(tmp)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def _extract_archive(archive: Path, root: Path, ds: DatasetInfo, wanted: Sequence[str]) -> None:
  """Copy the `wanted` members out of a tar.gz, each verified, via temp file + os.replace.

  Output paths come from the registry, never from member names, and only regular-file members
  whose normalised name equals a wanted path are read: no path traversal, no links.
  """
  found = set()
  with tarfile.open(archive, "r:gz") as tar:
    for member in tar:
      rel = os.path.normpath(member.name).replace(os.sep, "/")
      if rel not in wanted or rel in found or not member.isreg():
        continue
      dest = root / rel
      dest.parent.mkdir(parents=True, exist_ok=True)
      fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".extract-", suffix=".part")
      try:
        with os.fdopen(fd, "wb") as out, tar.extractfile(member) as src:
          shutil.copyfileobj(src, out, 1 << 20)
        verify_file(tmp, ds.sha256[rel])
        os.replace(tmp, dest)
      except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
      found.add(rel)
  missing = [w for w in wanted if w not in found]
  if missing:
    raise DataError(f"{archive.name}: archive lacks regular-file members {missing}")


def download(
    name: str, data_dir: str | os.PathLike | None = None, mirrors: Sequence[str] | None = None
) -> Path:
  """Fetch the dataset's missing files into <data_dir>/<name>/, verified; returns that dir.

  Mirrors are tried in order (argument, $TP_JAX_MIRROR_<NAME>, official). Each file lands via a
  temp file + os.replace, so a failed or mismatching download leaves nothing behind.
  """
  ds = info(name)
  root = resolve_data_dir(data_dir) / name
  missing = [rel for rel in ds.sha256 if not (root / rel).exists()]
  if not missing:
    return root
  root.mkdir(parents=True, exist_ok=True)
  bases = mirror_urls(name, mirrors)
  # Archive datasets come as one file; otherwise each missing file is its own download.
  jobs = [(ds.archive, missing)] if ds.archive else [(rel, [rel]) for rel in missing]
  failures = []
  for remote, targets in jobs:  # keep going after a failure, so one error names every problem
    errors = []
    for base in bases:
      url = base + remote
      try:
        if ds.archive:
          tmp = _fetch(url, root, None)  # no official archive sha256; members are verified
          try:
            _extract_archive(tmp, root, ds, targets)
          finally:
            tmp.unlink(missing_ok=True)
        else:
          tmp = _fetch(url, root, ds.sha256[remote])
          os.replace(tmp, root / remote)
        break
      except (
          OSError,
          http.client.HTTPException,
          DataError,
          tarfile.TarError,
          EOFError,
          zlib.error,
      ) as e:
        errors.append(f"{url}: {e}")
    else:
      failures.append(f"could not download {name}/{remote}; tried:\n  " + "\n  ".join(errors))
  if failures:
    raise DataError("\n".join(failures))
  return root


# ----------------------------------------------------------------------------- loading


def load(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    verify: bool = True,
    download: bool = True,
    mirrors: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """(images_NHWC uint8, labels int32) for one split, read from disk (downloaded if missing)."""
  ds = info(name)
  paths = expected_paths(name, split, data_dir)
  if not all(p.exists() for p in paths):
    _download_or_explain(ds, split, paths, data_dir, download, mirrors)
  if verify:
    for p, rel in zip(paths, ds.files[split]):
      verify_file(p, ds.sha256[rel])
  if ds.archive is None:
    images = parse_idx_images(paths[0], ds.image_shape)
    labels = parse_idx_labels(paths[1], ds.num_classes)
    if len(images) != len(labels):
      raise DataError(
          f"{paths[1]}: {len(labels)} labels but {paths[0].name} has {len(images)} images"
      )
    return images, labels
  parts = [parse_cifar_batch(p, ds.num_classes) for p in paths]
  return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def _download_or_explain(
    ds: DatasetInfo, split: str, paths: list[Path], data_dir, allow: bool, mirrors
) -> None:
  """Download missing files if allowed, else raise a DataError saying where they were expected."""
  # Lives outside `load` because there the bool argument `download` shadows the function.
  reason = "download=False, so no download was attempted"
  if allow:
    try:
      download(ds.name, data_dir, mirrors)
      if all(p.exists() for p in paths):
        return
      reason = "download finished but files are still missing"
    except DataError as e:
      reason = f"download failed: {e}"
  urls = [
      base + (ds.archive or rel)
      for base in mirror_urls(ds.name, mirrors)
      for rel in ds.files[split]
  ]
  urls = list(dict.fromkeys(urls))
  missing = "\n  ".join(f"{p}{'' if p.exists() else '  (missing)'}" for p in paths)
  raise DataError(
      f"{ds.name}/{split}: data files not found. Expected under data dir {resolve_data_dir(data_dir)}:\n"
      f"  {missing}\n"
      f"Set ${DATA_ENV} or pass data_dir= to point elsewhere; mirrors "
      f"(override with ${MIRROR_ENV_PREFIX}{ds.name.upper()}): {', '.join(urls)}\n{reason}"
  )


# ----------------------------------------------------------------------------- TFDS backend

BACKENDS = ("native", "tfds")


def tfds_manual_files(name: str) -> tuple[str, ...]:
  """The official files TFDS's builder for `name` looks up in its manual_dir, by the names
  TFDS registers: the four idx .gz files, or CIFAR-10's official tarball."""
  ds = info(name)
  return (
      (ds.archive,) if ds.archive else tuple(dict.fromkeys(f for s in SPLITS for f in ds.files[s]))
  )


def load_tfds(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    tfds_data_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """(images_NHWC uint8, labels int32) of one split through TFDS's own builder.

  TFDS reads the official files from manual_dir = <data_dir>/<name>/ (the native layout for
  MNIST and Fashion-MNIST; CIFAR-10 needs the official cifar-10-binary.tar.gz there), checks
  them against its own registered sha256 sums and prepares its records once under
  `tfds_data_dir` (default $TFDS_DATA_DIR or ~/tensorflow_datasets). With download=False a
  missing file is an error instead of a TFDS download. The examples are the native loader's,
  in TFDS's order, so a seed does not reproduce a native-backend run.
  """
  ds = info(name)
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r} for {name}; valid: {SPLITS}")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(
        f"data backend 'tfds' needs tensorflow-datasets and tensorflow "
        f"(pip install 'tp-jax[tfds]'): {e}"
    ) from e
  manual_dir = resolve_data_dir(data_dir) / name
  missing = [manual_dir / f for f in tfds_manual_files(name) if not (manual_dir / f).exists()]
  if missing and not download:
    raise DataError(
        f"{name}: TFDS reads the official files from {manual_dir}, but these are "
        f"missing (download=False): {', '.join(map(str, missing))}"
    )
  builder = tfds.builder(name, data_dir=None if tfds_data_dir is None else str(tfds_data_dir))
  try:
    # One download dir per dataset: TFDS caches the extraction of a manual file under its file
    # name alone, so Fashion-MNIST prepared after MNIST in a shared dir got MNIST's images.
    builder.download_and_prepare(
        download_dir=str(Path(builder.data_dir_root) / "downloads" / f"tp_jax_{name}"),
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)),
    )
  except tfds.core.download.download_manager.NonMatchingChecksumError as e:
    raise DataError(
        f"{name}: a file in {manual_dir} does not match TFDS's registered sha256: {e}"
    ) from e
  arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  images, labels = arrays["image"], arrays["label"].astype(np.int32)
  expected = (ds.num_examples[split], *ds.image_shape)
  if images.shape != expected or images.dtype != np.uint8 or labels.shape != expected[:1]:
    raise DataError(
        f"{name}/{split} from TFDS: images {images.shape} {images.dtype}, labels "
        f"{labels.shape}; expected uint8 images {expected} and one label each"
    )
  return images, labels


# ----------------------------------------------------------------------------- device pipeline


class Dataset(NamedTuple):
  """Normalised float32 images (NHWC) and int32 labels on device, plus the registry entry."""

  x_train: jax.Array
  y_train: jax.Array
  x_test: jax.Array
  y_test: jax.Array
  info: DatasetInfo


def normalise(x_uint8: jax.Array, name: str) -> jax.Array:
  """uint8 NHWC -> float32 (x/255 - mean) / std with the dataset's per-channel statistics."""
  ds = info(name)
  mean = jnp.asarray(ds.mean, jnp.float32)
  std = jnp.asarray(ds.std, jnp.float32)
  return (jnp.asarray(x_uint8).astype(jnp.float32) / 255.0 - mean) / std


def epoch_permutation(key: jax.Array, n: int) -> jax.Array:
  """A random permutation of range(n) (int32)."""
  return jax.random.permutation(key, n)


def batches(key: jax.Array, n: int, batch_size: int) -> jax.Array:
  """Shuffled example indices [n // batch_size, batch_size]; the remainder is dropped."""
  if not 0 < batch_size <= n:
    raise ValueError(f"batch_size must be in [1, n={n}], got {batch_size}")
  num_batches = n // batch_size
  return epoch_permutation(key, n)[: num_batches * batch_size].reshape(num_batches, batch_size)


@functools.partial(jax.jit, static_argnames="pad")
def augment(key: jax.Array, x_NHWC: jax.Array, pad: int = 4) -> jax.Array:
  """Per-example random crop (edge padding of `pad` pixels) and random horizontal flip.

  Edge padding (border pixels repeated) as in the reference code (scalingDTP's
  RandomCrop(padding_mode="edge")). Zero padding after `normalise` would fill whole 4x4
  patches with the dataset mean, which a Mixer embeds as its bias alone: a token with zero
  variance, whose LayerNorm feedback then scales targets by 1/sqrt(eps).
  Pure jax.random with fixed shapes; jitted here (pad static) and fine inside another jit.
  """
  n, h, w, c = x_NHWC.shape
  k_y, k_x, k_f = jax.random.split(key, 3)
  # Draw all offsets/flips at once: three random ops instead of three per example.
  dy_N = jax.random.randint(k_y, (n,), 0, 2 * pad + 1)
  dx_N = jax.random.randint(k_x, (n,), 0, 2 * pad + 1)
  flip_N = jax.random.bernoulli(k_f, 0.5, (n,))
  padded_NHWC = jnp.pad(x_NHWC, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")

  def crop(x_HWC, dy, dx):
    return jax.lax.dynamic_slice(x_HWC, (dy, dx, 0), (h, w, c))

  crops_NHWC = jax.vmap(crop)(padded_NHWC, dy_N, dx_N)
  return jnp.where(flip_N[:, None, None, None], crops_NHWC[:, :, ::-1], crops_NHWC)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    verify: bool = True,
    download: bool = True,
    mirrors: Sequence[str] | None = None,
    device: jax.Device | None = None,
    backend: str = "native",
) -> Dataset:
  """Both splits, normalised float32 NHWC and int32 labels, placed on `device` (default device).

  `backend` is 'native' (`load`) or 'tfds' (`load_tfds`, which checks TFDS's own registered
  sha256 sums whatever `verify` says and downloads through TFDS; `mirrors` do not apply).
  """
  ds = info(name)
  if backend == "native":
    read = functools.partial(
        load, data_dir=data_dir, verify=verify, download=download, mirrors=mirrors
    )
  elif backend == "tfds":
    read = functools.partial(load_tfds, data_dir=data_dir, download=download)
  else:
    raise DataError(f"unknown data backend {backend!r}; valid: {BACKENDS}")
  norm = jax.jit(functools.partial(normalise, name=name))
  out = []
  for split in SPLITS:
    x, y = read(name, split)
    # Ship uint8 and normalise on device: 4x less host->device traffic than float32.
    out += [norm(jax.device_put(x, device)), jax.device_put(y, device)]
  return Dataset(*out, info=ds)
