"""`npz:PATH`: a numpy .npz file of arrays.

Required: `x_train`, `y_train`, `x_test`, `y_test`; optional: `x_unlabeled`
(images without labels) and `class_names` (one name per class id). Images are
uint8 [N, H, W, C] or [N, H, W] (grayscale); labels are integers in
[0, num_classes), where num_classes is len(class_names) if given, else
max(y_train) + 1, and every class has train examples. If some arrays have 3
channels and others 1, the 1-channel ones repeat it into RGB. With
`data.image_size` set, images are resized (bilinear, Pillow); otherwise train,
test and unlabeled images must have one height and width.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from r2d2_jax.data import custom
from r2d2_jax.errors import R2D2Error

REQUIRED = ("x_train", "y_train", "x_test", "y_test")


def fingerprint(path: str) -> tuple[str, int, int]:
  """(absolute path, size, mtime) of the file; an error naming it if absent."""
  full = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(full):
    raise R2D2Error(f"data.dataset='npz:{path}': {full} is not a file. Give "
                    "the path of a .npz file made with numpy.savez.")
  st = os.stat(full)
  return full, st.st_size, st.st_mtime_ns


def _images(name: str, x: np.ndarray, source: str) -> np.ndarray:
  if x.dtype != np.uint8:
    raise R2D2Error(
        f"{source}: array {name!r} is {x.dtype}, expected uint8 pixels in "
        f"0..255. Convert it (e.g. np.round(x * 255).astype(np.uint8) for "
        "images in [0, 1]).")
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise R2D2Error(
        f"{source}: array {name!r} has shape {x.shape}, expected [N, H, W, C] "
        "or [N, H, W] (grayscale).")
  if not len(x):
    raise R2D2Error(f"{source}: array {name!r} holds no images.")
  return x


def _labels(name: str, y: np.ndarray, n: int, source: str) -> np.ndarray:
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise R2D2Error(
        f"{source}: array {name!r} has shape {y.shape} and dtype {y.dtype}, "
        "expected one integer class id per image (shape [N]).")
  if len(y) != n:
    raise R2D2Error(
        f"{source}: array {name!r} holds {len(y)} labels for {n} images in "
        f"{'x_' + name[2:]!r}; give one label per image.")
  return y.astype(np.int64)


def read(path: str, size: tuple[int, int] | None) -> custom.Raw:
  """Reads the arrays of `path` and checks them; images resized to `size`."""
  full = fingerprint(path)[0]
  source = f"npz:{full}"
  try:
    with np.load(full, allow_pickle=False) as f:
      data = {k: f[k] for k in f.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise R2D2Error(
        f"{source}: cannot read it as a numpy .npz file ({type(e).__name__}: "
        f"{e}). Write it with np.savez(path, x_train=..., y_train=..., "
        "x_test=..., y_test=...).") from None
  missing = [k for k in REQUIRED if k not in data]
  if missing:
    raise R2D2Error(
        f"{source}: missing array{'s' if len(missing) > 1 else ''} "
        f"{', '.join(missing)} (it holds: {', '.join(sorted(data)) or 'none'})."
        " An npz dataset needs x_train, y_train, x_test and y_test, and may "
        "add x_unlabeled and class_names.")
  xs = {k: _images(k, data[k], source)
        for k in ("x_train", "x_test", "x_unlabeled") if k in data}
  ys = {k: _labels(k, data[k], len(xs["x" + k[1:]]), source)
        for k in ("y_train", "y_test")}
  if "class_names" in data:
    names = tuple(str(s) for s in np.asarray(data["class_names"]).ravel())
    num_classes, how = len(names), f"len(class_names) = {len(names)}"
  else:
    names = None
    num_classes = int(ys["y_train"].max()) + 1
    how = f"max(y_train) + 1 = {num_classes}"
  for k, y in ys.items():
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if len(bad):
      raise R2D2Error(
          f"{source}: array {k!r} has labels outside the class range "
          f"[0, {num_classes - 1}] ({how}): e.g. {int(y[bad[0]])} at position "
          f"{int(bad[0])}, {len(bad)} in all. Class ids must be 0..C-1"
          + (" with every class in y_train." if names is None else
             "; add the missing class names or fix the labels."))
  channels = {k: x.shape[-1] for k, x in xs.items()}
  if len(set(channels.values())) > 1:
    if set(channels.values()) == {1, 3}:
      xs = {k: custom.to_rgb(x) for k, x in xs.items()}
    else:
      raise R2D2Error(
          f"{source}: the arrays have different channel counts ("
          + ", ".join(f"{k}: {c}" for k, c in channels.items())
          + "); give them all the same C (1 and 3 are matched by repeating "
          "grayscale into RGB).")
  if size is None:
    shapes = {k: x.shape[1:3] for k, x in xs.items()}
    if len(set(shapes.values())) > 1:
      raise R2D2Error(
          f"{source}: the arrays hold images of different sizes ("
          + ", ".join(f"{k}: {h}x{w}" for k, (h, w) in shapes.items())
          + ", height x width). Set data.image_size=(H, W) (or S for S x S) "
          "to resize them all, or make them one size.")
  else:
    xs = {k: custom.resize(x, size) for k, x in xs.items()}
  return custom.Raw(
      train=(xs["x_train"], ys["y_train"]), test=(xs["x_test"], ys["y_test"]),
      unlabeled=xs.get("x_unlabeled"), num_classes=num_classes, source=source,
      class_names=names)
