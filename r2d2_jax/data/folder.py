"""`folder:PATH`: PNG / JPEG images in class folders, read with Pillow.

    PATH/train/CLASS/*.png|jpg|jpeg   labeled train images, one folder a class
    PATH/test/CLASS/*                 test images (classes a subset of train's)
    PATH/unlabeled/*                  optional: images without a class

Class ids are the train class folders' names in sorted order. Train rows are
ordered by class id, then file name; the unlabeled images follow them (sorted
by name) with the label `custom.UNKNOWN_LABEL`. Hidden files (a leading '.')
are skipped; any other file that is not .png / .jpg / .jpeg is an error, as is
a folder inside a class folder.

Channels: if every image is grayscale (Pillow modes 1, L, LA, I, I;16, F),
images are [H, W, 1]; if any is colour (RGB, RGBA, P, CMYK, ...), every image
is converted to RGB and grayscale ones repeat their channel 3 times. Alpha is
dropped; 16-bit images keep their top 8 bits. Images are resized (bilinear) to
`data.image_size` when it is set; otherwise they must all have one size.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os

import numpy as np

from r2d2_jax.data import custom
from r2d2_jax.errors import R2D2Error

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_GRAY_MODES = ("1", "L", "LA", "I", "F", "I;16", "I;16B", "I;16L", "I;16N")


@dataclasses.dataclass(frozen=True)
class Listing:
  """The files of a folder dataset, before decoding.

  Attributes:
    root: PATH.
    classes: class names (sorted; index = class id).
    train: (path, name relative to train/, class id) of each train image.
    test: (path, name relative to test/, class id) of each test image.
    unlabeled: paths of the unlabeled images ([] without an unlabeled/ folder).
    fingerprint: a digest of every file's name, size and modification time.
  """
  root: str
  classes: tuple[str, ...]
  train: tuple[tuple[str, str, int], ...]
  test: tuple[tuple[str, str, int], ...]
  unlabeled: tuple[str, ...]
  fingerprint: str


def _source(root: str) -> str:
  return f"folder:{root}"


def _visible(folder: str) -> list[str]:
  return sorted(e for e in os.listdir(folder) if not e.startswith("."))


def _image_files(folder: str, root: str, what: str) -> list[str]:
  """The image files directly in `folder`, sorted; errors for anything else."""
  files = []
  for entry in _visible(folder):
    path = os.path.join(folder, entry)
    if os.path.isdir(path):
      raise R2D2Error(
          f"{_source(root)}: {path} is a folder inside {what}; images must lie "
          f"directly in {folder} (nested folders are not read). Move its "
          "images up or remove it.")
    if not entry.lower().endswith(IMAGE_EXTENSIONS):
      raise R2D2Error(
          f"{_source(root)}: {path} is not a PNG or JPEG file (its name does "
          f"not end in {', '.join(IMAGE_EXTENSIONS)}). Remove it, or convert "
          "it to PNG.")
    files.append(entry)
  return files


def _class_folders(split_dir: str, root: str) -> list[str]:
  if not os.path.isdir(split_dir):
    raise R2D2Error(
        f"{_source(root)}: {split_dir} is not a folder. A folder dataset needs "
        f"{os.path.join(root, 'train')}/CLASS/* and "
        f"{os.path.join(root, 'test')}/CLASS/* (and optionally "
        f"{os.path.join(root, 'unlabeled')}/*).")
  classes = []
  for entry in _visible(split_dir):
    path = os.path.join(split_dir, entry)
    if not os.path.isdir(path):
      raise R2D2Error(
          f"{_source(root)}: {path} is a file directly in {split_dir}, which "
          "must hold one folder per class (its images inside). Move it into "
          "its class folder, or into unlabeled/ if it has no class.")
    classes.append(entry)
  if not classes:
    raise R2D2Error(f"{_source(root)}: {split_dir} has no class folders; put "
                    "each class's images in a folder named after the class.")
  return classes


def _labeled(split: str, root: str, classes: list[str]
             ) -> list[tuple[str, str, int]]:
  split_dir = os.path.join(root, split)
  found = _class_folders(split_dir, root)
  ids = {c: i for i, c in enumerate(classes)}
  out = []
  for c in found:
    folder = os.path.join(split_dir, c)
    if c not in ids:
      raise R2D2Error(
          f"{_source(root)}: class folder {folder} has no counterpart in "
          f"{os.path.join(root, 'train')} (train classes: "
          f"{', '.join(classes)}). Every test class needs training images: "
          "add train/" + c + "/ or remove the test folder.")
    files = _image_files(folder, root, f"class folder {folder}")
    if not files:
      raise R2D2Error(
          f"{_source(root)}: class folder {folder} is empty (no .png/.jpg/"
          ".jpeg files). Add its images or remove the folder.")
    out.extend((os.path.join(folder, f), f"{c}/{f}", ids[c]) for f in files)
  out.sort(key=lambda e: (e[2], e[1]))
  return out


def scan(path: str) -> Listing:
  """Lists the files of the folder dataset at `path` and checks its layout."""
  root = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(root):
    raise R2D2Error(f"data.dataset='folder:{path}': {root} is not a folder.")
  classes = _class_folders(os.path.join(root, "train"), root)
  train = _labeled("train", root, classes)
  test = _labeled("test", root, classes)
  unlabeled: list[str] = []
  udir = os.path.join(root, "unlabeled")
  if os.path.exists(udir):
    if not os.path.isdir(udir):
      raise R2D2Error(f"{_source(root)}: {udir} must be a folder of images.")
    unlabeled = [os.path.join(udir, f)
                 for f in _image_files(udir, root, "the unlabeled folder")]
    if not unlabeled:
      raise R2D2Error(
          f"{_source(root)}: the unlabeled folder {udir} is empty. Add images "
          "to it or remove it.")
  digest = hashlib.sha256()
  for p in [e[0] for e in train] + [e[0] for e in test] + unlabeled:
    st = os.stat(p)
    digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return Listing(root, tuple(classes), tuple(train), tuple(test),
                 tuple(unlabeled), digest.hexdigest())


def _decode(path: str, root: str, size: tuple[int, int] | None
            ) -> tuple[np.ndarray, bool]:
  """One image as uint8 [H, W] (grayscale) or [H, W, 3], and whether colour."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as img:
      img.load()
      mode = img.mode
      gray = mode in _GRAY_MODES
      if mode.startswith("I;16") or mode == "I":
        x = np.asarray(img, np.int64)
        if mode == "I" and x.max(initial=0) <= 255:
          x = np.clip(x, 0, 255)
        else:
          x = np.clip(x, 0, 65535) >> 8
        img = Image.fromarray(x.astype(np.uint8), "L")
      elif mode == "F":
        x = np.clip(np.asarray(img, np.float64), 0, 255)
        img = Image.fromarray(np.round(x).astype(np.uint8), "L")
      else:
        img = img.convert("L" if gray else "RGB")
      if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
      return np.asarray(img, np.uint8), not gray
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise R2D2Error(
        f"{_source(root)}: cannot read image {path} ({type(e).__name__}: "
        f"{e}). Replace it with a valid PNG or JPEG file, or remove it."
    ) from None


def _decode_all(paths: list[str], root: str, size: tuple[int, int] | None
                ) -> list[tuple[np.ndarray, bool]]:
  if len(paths) < 64:
    return [_decode(p, root, size) for p in paths]
  workers = min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(lambda p: _decode(p, root, size), paths))


def read(listing: Listing, size: tuple[int, int] | None) -> custom.Raw:
  """Decodes every image of `listing` (resized to `size` = (H, W), if set)."""
  root = listing.root
  paths = ([e[0] for e in listing.train] + [e[0] for e in listing.test] +
           list(listing.unlabeled))
  decoded = _decode_all(paths, root, size)
  color = any(c for _, c in decoded)
  first = decoded[0][0].shape[:2]
  for (x, _), p in zip(decoded, paths):
    if x.shape[:2] != first:
      raise R2D2Error(
          f"{_source(root)}: images have different sizes: {paths[0]} is "
          f"{first[1]}x{first[0]} (width x height) and {p} is "
          f"{x.shape[1]}x{x.shape[0]}. Set data.image_size=(H, W) (or S for "
          "S x S) to resize every image, or make them one size.")
  channels = 3 if color else 1

  def stack(items):
    out = np.empty((len(items), *first, channels), np.uint8)
    for i, (x, _) in enumerate(items):
      out[i] = x[..., None] if x.ndim == 2 else x
    return out

  n_train, n_test = len(listing.train), len(listing.test)
  train = stack(decoded[:n_train])
  test = stack(decoded[n_train:n_train + n_test])
  unlabeled = (stack(decoded[n_train + n_test:]) if listing.unlabeled
               else None)
  return custom.Raw(
      train=(train, np.array([e[2] for e in listing.train], np.int32)),
      test=(test, np.array([e[2] for e in listing.test], np.int32)),
      unlabeled=unlabeled, num_classes=len(listing.classes),
      source=_source(root),
      train_names=tuple(e[1] for e in listing.train),
      class_names=listing.classes)
