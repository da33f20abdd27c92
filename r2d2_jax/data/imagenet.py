"""ImageNet (ILSVRC 2012) streamed from tensorflow-datasets, as global sharded batches.

`StreamingPipeline` satisfies `interface.Pipeline`, as `pipeline.InMemoryPipeline` does: at each step
it yields
  {'labeled':   {'image': uint8 [B, S, S, 3], 'label': int32 [B], 'index': int32 [B]},
   'unlabeled': {'image': uint8 [μB, S, S, 3], ...}}
where S is `data.image_size` (224) and `index` is the example's row in the train
split, so per-example tables (R2-D2's pseudo-labels) work as for small datasets.

The row of an example is read from its tfds id, `<...>.tfrecord-00012-of-01024__345`
(shard 12, position 345 in that shard): index = first row of shard 12 + 345,
the first rows coming from the split's `shard_lengths` in the dataset metadata.
This is the order tfds itself uses for slices such as 'train[1000:2000]'.

How it differs from the in-memory pipeline:
  * The order is not a pure function of (seed, step). Shuffling is seeded by
    (seed, start_step), so a run resumed at step k draws a fresh order (it does
    not replay what it would have seen from step k on, and does not repeat the
    order it started with); the labeled split itself is exactly the same.
  * Images are decoded and cropped on the host: train images get an
    Inception-style random-resized crop (area 8%..100%, aspect 3/4..4/3) to
    S x S; flips and RandAugment happen later on device, from (seed, step,
    index), as for every dataset. Eval images are centre crops of 87.5% of
    the shorter side (= resize the shorter side to 256 and crop 224) resized
    to S x S.
  * To choose the class-balanced labeled subset every train label is needed:
    one pass over the train split reads (id, label) without decoding images
    and is cached as `imagenet_labels.npz` in the workdir (or at
    `data.label_cache`); later runs reuse it. On real ImageNet the pass reads
    the whole train split once (~140 GB); each process reads only its share.
    Stages of a staged run have their own workdirs, so set `data.label_cache`
    to share one file between them.
  * The labeled stream reads this process's share of the whole train split and
    keeps the labeled examples, so with 10% labels it reads ~10 records per
    example it keeps.
  * Each process reads only its share of each split: contiguous row ranges
    `[start, stop)` as in `tfds.even_splits`.

Config keys (the `data` block): dataset, data_dir, manual_dir, num_labels or
labeled_fraction (e.g. 0.1: round(0.1 * n_c) labels of each class c, at least 1;
takes precedence over num_labels), num_val (a class-balanced validation set
carved from the train split by the label cache's rows, drawn before the labels
and outside both streams; its eval reads the train split's records and keeps
those rows, so on real ImageNet each validation eval reads the whole train
split (~140 GB) and decodes only the kept rows: evaluate rarely),
split_seed, unlabeled ('rest' / 'all'),
batch_size, uratio, eval_batch_size, and optionally image_size (224),
shuffle_buffer (10_000 encoded images per stream) and label_cache (a path).

ImageNet cannot be downloaded automatically: put ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar (from https://image-net.org) in a folder and set
`data.manual_dir` to it; the first run prepares the dataset in `data.data_dir`
(hours, ~150 GB). A multi-process run should use a data_dir every process can
read; process 0 prepares it.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from r2d2_jax import paths
from r2d2_jax import sharding
from r2d2_jax.data import interface
from r2d2_jax.data import sources
from r2d2_jax.data import tfds_extra
from r2d2_jax.errors import R2D2Error

# Without the tfds extra this module does not import: an R2D2Error says how
# to install it.
tf, tfds = tfds_extra.import_tfds("dataset 'imagenet2012'")

try:  # tf.data must not take accelerator memory from JAX.
  tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # already initialised, or no such device
  pass

# Fraction of the shorter side kept by the eval centre crop (224 / 256).
EVAL_CROP_FRACTION = 0.875
# Inception-style random-resized crop.
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)

LABEL_CACHE = "imagenet_labels.npz"
_ID_PATTERN = r"^.*-(\d+)-of-(\d+)__(\d+)$"
_SPLIT_NAMES = {"train": "train", "test": "validation"}


# ---------------------------------------------------------------------------
# Pure helpers (tested on their own)


def process_share(n: int, process_index: int,
                  process_count: int) -> tuple[int, int]:
  """Rows [start, stop) of an n-row split read by one process.

  As `tfds.even_splits(drop_remainder=False)`: the first n % count processes
  get one row more.
  """
  base, extra = divmod(n, process_count)
  start = process_index * base + min(process_index, extra)
  return start, start + base + (process_index < extra)


def shard_offsets(shard_lengths: list[int] | np.ndarray) -> np.ndarray:
  """First row of each shard: [0, len0, len0 + len1, ...]."""
  return np.concatenate([[0], np.cumsum(shard_lengths)[:-1]]).astype(np.int64)


def tfds_id_to_index(tfds_id: tf.Tensor, offsets: tf.Tensor) -> tf.Tensor:
  """Row in the split of an example, from its tfds id (inside tf.data).

  Args:
    tfds_id: string tensor like b'imagenet2012-train.tfrecord-00012-of-01024__345'.
    offsets: int64 [num_shards], the first row of each shard.

  Returns:
    int64 tensor of the same shape: offsets[12] + 345.
  """
  ok = tf.reduce_all(tf.strings.regex_full_match(tfds_id, _ID_PATTERN))
  check = tf.debugging.Assert(ok, ["Unexpected tfds_id format:", tfds_id],
                              summarize=3)
  with tf.control_dependencies([check]):
    shard = tf.strings.to_number(
        tf.strings.regex_replace(tfds_id, _ID_PATTERN, r"\1"), tf.int64)
    num_shards = tf.strings.to_number(
        tf.strings.regex_replace(tfds_id, _ID_PATTERN, r"\2"), tf.int64)
    position = tf.strings.to_number(
        tf.strings.regex_replace(tfds_id, _ID_PATTERN, r"\3"), tf.int64)
  n = tf.shape(offsets, out_type=tf.int64)[0]
  # A dataset written as one file (e.g. tfds's mock data) has shard 0 of 1.
  same = tf.reduce_all((num_shards == n) | (num_shards == 1))
  check = tf.debugging.Assert(
      same, ["tfds_id names more shards than the metadata has:", tfds_id, n],
      summarize=3)
  with tf.control_dependencies([check]):
    return tf.gather(offsets, shard) + position


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def train_crop(encoded: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
  """Inception-style random-resized crop of a JPEG to uint8 [size, size, 3]."""
  shape = tf.image.extract_jpeg_shape(encoded)
  begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.zeros([1, 0, 4], tf.float32), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=CROP_ASPECT_RANGE,
      area_range=CROP_AREA_RANGE, max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
  image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
  image = tf.image.resize(image, [size, size], method="bilinear",
                          antialias=True)
  return _to_uint8(image)


def eval_crop(encoded: tf.Tensor, size: int) -> tf.Tensor:
  """Centre crop (87.5% of the shorter side) of a JPEG, resized to [size, size, 3]."""
  shape = tf.image.extract_jpeg_shape(encoded)
  h, w = shape[0], shape[1]
  side = tf.cast(tf.round(EVAL_CROP_FRACTION *
                          tf.cast(tf.minimum(h, w), tf.float32)), tf.int32)
  side = tf.maximum(side, 1)
  window = tf.stack([(h - side) // 2, (w - side) // 2, side, side])
  image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
  image = tf.image.resize(image, [size, size], method="bilinear",
                          antialias=True)
  return _to_uint8(image)


def _seed(*parts: int) -> int:
  """A 63-bit seed derived from integers (stable across runs and machines)."""
  state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2)
  return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


# ---------------------------------------------------------------------------
# The dataset on disk


def _prepared_builder(info: sources.DatasetInfo, data_dir: str | None,
                      manual_dir: str | None):
  """The tfds builder of a prepared dataset, preparing it from manual_dir if needed."""
  builder = tfds.builder(info.tfds_name, data_dir=data_dir)
  if builder.is_prepared():
    return builder
  if not manual_dir:
    root = getattr(builder, "data_dir_root", None)
    default = (os.path.join(os.fspath(root), "downloads", "manual") if root
               else None)
    if default and all(os.path.exists(os.path.join(default, f))
                       for f in info.manual_files):
      manual_dir = default
  if not manual_dir:
    raise R2D2Error(
        f"{info.name!r} is not prepared in data_dir={data_dir!r} (looked in "
        f"{os.fspath(builder.data_dir)!r}) and must be downloaded by hand: get "
        f"{' and '.join(info.manual_files)} from https://image-net.org "
        "(an account is needed), put them in one folder and set "
        "data.manual_dir to that folder (or put them in <data_dir>/downloads/"
        "manual). The first run then prepares the dataset in data_dir "
        "(hours, about 150 GB besides the tar files).")
  if jax.process_index() == 0:
    # ImageNet cannot be downloaded automatically: no "unset manual_dir" advice.
    sources.check_manual_dir(
        info, manual_dir,
        advice=(f"That folder must hold {' and '.join(info.manual_files)} as "
                "downloaded by hand from https://image-net.org (an account is "
                "needed)."))
    logging.info("Preparing %s from %s into %s (once; this takes hours on the "
                 "real dataset).", info.name, manual_dir, builder.data_dir)
    try:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=manual_dir, try_download_gcs=False))
    except Exception as e:  # tfds raises many kinds; all mean "cannot build".
      raise R2D2Error(
          f"Preparing {info.name!r} from manual_dir={manual_dir!r} into "
          f"data_dir={data_dir!r} failed: {type(e).__name__}: {e}") from e
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("r2d2_jax imagenet prepared")
    builder = tfds.builder(info.tfds_name, data_dir=data_dir)
    if not builder.is_prepared():
      raise R2D2Error(
          f"Process {jax.process_index()} cannot see the {info.name!r} that "
          f"process 0 prepared in data_dir={data_dir!r}: use a data_dir that "
          "every process can read.")
  return builder


def _split_info(builder, name: str):
  try:
    split = builder.info.splits[name]
  except KeyError as e:
    raise R2D2Error(
        f"{builder.name!r} in {os.fspath(builder.data_dir)!r} has no {name!r} "
        f"split (splits: {list(builder.info.splits.keys())}). Prepare it "
        "again from the original tar files (data.manual_dir).") from e
  lengths = [int(x) for x in split.shard_lengths]
  if not lengths or sum(lengths) != split.num_examples:
    raise R2D2Error(
        f"The metadata of {builder.name!r} split {name!r} in "
        f"{os.fspath(builder.data_dir)!r} lacks shard lengths "
        f"({lengths}, {split.num_examples} examples); prepare it again.")
  return split.num_examples, lengths


def _read(builder, split: str, shuffle_seed: int | None = None,
          decoders: Any = None) -> tf.data.Dataset:
  """Examples of `split` with a 'tfds_id'; JPEGs left encoded."""
  read_config = tfds.ReadConfig(add_tfds_id=True, try_autocache=False,
                                shuffle_seed=shuffle_seed)
  return builder.as_dataset(
      split=split, shuffle_files=shuffle_seed is not None,
      decoders=({"image": tfds.decode.SkipDecoding()} if decoders is None
                else decoders),
      read_config=read_config)


def _slice(name: str, start: int, stop: int) -> str:
  return f"{name}[{start}:{stop}]"


def scan_labels(builder, num_train: int, offsets: np.ndarray,
                process_index: int, process_count: int) -> np.ndarray:
  """Labels of this process's share of the train split, by row.

  Reads (tfds_id, label) without the images and checks that every row of the
  share is seen exactly once.

  Returns:
    int32 [stop - start] labels of rows start..stop-1.
  """
  start, stop = process_share(num_train, process_index, process_count)
  out = np.full(stop - start, -1, np.int32)
  if stop == start:
    return out
  ds = _read(builder, _slice("train", start, stop),
             decoders=tfds.decode.PartialDecoding({"label": True}))
  offsets_t = tf.constant(offsets, tf.int64)
  ds = ds.map(lambda ex: (tfds_id_to_index(ex["tfds_id"], offsets_t),
                          tf.cast(ex["label"], tf.int32)),
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(8192).prefetch(tf.data.AUTOTUNE)
  seen = 0
  for index, label in ds.as_numpy_iterator():
    local = index - start
    if local.min() < 0 or local.max() >= len(out) or (out[local] >= 0).any():
      raise R2D2Error(
          f"The train split of {builder.name!r} in "
          f"{os.fspath(builder.data_dir)!r} does not match its metadata (rows "
          f"outside [{start}, {stop}) or seen twice); prepare it again.")
    out[local] = label
    seen += len(local)
  if seen != len(out) or (out < 0).any():
    raise R2D2Error(
        f"The train split of {builder.name!r} has {seen} examples for "
        f"{int((out >= 0).sum())} of the rows [{start}, {stop}), its metadata "
        f"says {len(out)}; prepare it again.")
  return out


def _load_cache(path: str, shard_lengths: list[int]) -> np.ndarray | None:
  data = paths.read_bytes(path)
  if data is None:
    return None
  try:
    with np.load(io.BytesIO(data)) as f:
      labels, saved = f["labels"], f["shard_lengths"]
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Ignoring unreadable label cache %s: %s", path, e)
    return None
  if saved.tolist() != list(shard_lengths) or len(labels) != sum(shard_lengths):
    logging.warning("Label cache %s is for other data files; reading labels "
                    "again.", path)
    return None
  return labels.astype(np.int32)


def _save_cache(path: str, labels: np.ndarray,
                shard_lengths: list[int]) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, labels=labels.astype(np.int32),
           shard_lengths=np.asarray(shard_lengths, np.int64))
  paths.write_bytes_atomic(path, buffer.getvalue())


# ---------------------------------------------------------------------------
# The pipeline


class StreamingPipeline:
  """Labeled/unlabeled batches of ImageNet streamed by tf.data.

  Args:
    config: the `data` block of the config.
    seed: the run's seed (split and shuffling derive from it).
    mesh: the device mesh.
    workdir: where the split and the label cache are saved (None: not saved).
  """

  def __init__(self, config: ml_collections.ConfigDict, seed: int, mesh: Mesh,
               workdir: str | None = None):
    base = sources.get_info(config.dataset)
    if base.in_memory or not base.tfds_name:
      raise R2D2Error(f"Dataset {config.dataset!r} is not a streamed dataset.")
    self.image_size = int(config.get("image_size") or base.image_shape[0])
    self.info = dataclasses.replace(base, image_shape=(
        self.image_size, self.image_size, base.image_shape[2]))
    self.mesh = mesh
    self.config = config
    self.seed = seed
    self.shuffle_buffer = int(config.get("shuffle_buffer") or 10_000)
    self.builder = _prepared_builder(base, config.get("data_dir"),
                                     config.get("manual_dir"))
    self._num_train, self._train_shards = _split_info(self.builder, "train")
    self._train_offsets = shard_offsets(self._train_shards)

    # Every train label, by row (cached).
    cache = config.get("label_cache") or (
        paths.join(workdir, LABEL_CACHE) if workdir else None)
    self._train_labels = self._labels(cache)

    # The labeled / unlabeled / validation split.
    self.split = interface.split_from_config(
        config, self._train_labels, base.num_classes, seed, workdir)

    self.batch_size, self.unlabeled_batch_size = interface.batch_sizes(
        config, mesh)
    self._pools = {"labeled": self.split.labeled}
    if self.unlabeled_batch_size:
      self._pools["unlabeled"] = self.split.unlabeled
    for stream, pool in self._pools.items():
      if not len(pool):
        raise R2D2Error(f"The {stream} set is empty; check data.num_labels / "
                        "data.labeled_fraction and data.unlabeled.")

  # -- facts -----------------------------------------------------------------

  @property
  def num_train(self) -> int:
    return self._num_train

  @property
  def train_labels(self) -> np.ndarray:
    """True labels of the whole train split, by row (for diagnostics)."""
    return self._train_labels

  def steps_per_epoch(self, stream: str = "unlabeled") -> int:
    """Steps for one pass over a stream (unlabeled if there is one)."""
    return interface.steps_per_epoch(
        self._pools, {"labeled": self.batch_size,
                      "unlabeled": self.unlabeled_batch_size}, stream)

  def _local(self, global_size: int) -> int:
    rows = sharding.process_slice(global_size, self.mesh)
    return rows.stop - rows.start

  # -- labels ----------------------------------------------------------------

  def _labels(self, cache: str | None) -> np.ndarray:
    labels = _load_cache(cache, self._train_shards) if cache else None
    count = jax.process_count()
    if count > 1:  # scan together unless every process has the cache
      have = multihost_utils.process_allgather(np.int32(labels is not None))
      if not np.all(have):
        labels = None
    if labels is not None:
      return labels
    logging.info("Reading the labels of the %d train examples (once).",
                 self._num_train)
    mine = scan_labels(self.builder, self._num_train, self._train_offsets,
                       jax.process_index(), count)
    if count > 1:
      longest = process_share(self._num_train, 0, count)[1]
      padded = np.full(longest, -1, np.int32)
      padded[:len(mine)] = mine
      every = np.asarray(multihost_utils.process_allgather(padded))
      sizes = [stop - start for start, stop in
               (process_share(self._num_train, p, count) for p in range(count))]
      labels = np.concatenate([every[p, :k] for p, k in enumerate(sizes)])
    else:
      labels = mine
    if cache:
      _save_cache(cache, labels, self._train_shards)
    return labels

  # -- train streams ---------------------------------------------------------

  def _stream(self, pool: np.ndarray, local_batch: int, seed: int,
              process_index: int, process_count: int) -> tf.data.Dataset:
    """This process's infinite stream of random-cropped batches from `pool`."""
    start, stop = process_share(self._num_train, process_index, process_count)
    in_pool = np.zeros(self._num_train, bool)
    in_pool[pool] = True
    if not in_pool[start:stop].any():
      raise R2D2Error(
          f"Process {process_index} reads train rows [{start}, {stop}), which "
          "hold none of this stream's examples; use fewer processes or more "
          "labels.")
    table = tf.constant(in_pool)
    offsets = tf.constant(self._train_offsets, tf.int64)
    size = self.image_size
    s_files, s_shuffle, s_crop = (_seed(seed, i) for i in range(3))

    def parse(ex):
      return {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32),
              "index": tfds_id_to_index(ex["tfds_id"], offsets)}

    def crop(i, ex):
      key = tf.stack([tf.constant(s_crop, tf.int64), i])
      return {"image": train_crop(ex["image"], key, size),
              "label": ex["label"], "index": tf.cast(ex["index"], tf.int32)}

    ds = _read(self.builder, _slice("train", start, stop), shuffle_seed=s_files)
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.filter(lambda ex: tf.gather(table, ex["index"]))
    ds = ds.repeat().shuffle(self.shuffle_buffer, seed=s_shuffle)
    ds = ds.enumerate().map(crop, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(local_batch, drop_remainder=True)

  def host_batches(self, start_step: int,
                   streams: tuple[str, ...] | None = None,
                   process_index: int | None = None,
                   process_count: int | None = None) -> tf.data.Dataset:
    """This process's rows of the global batches from `start_step` on (tf.data).

    Args:
      start_step: seeds the order, with the run's seed.
      streams: which of 'labeled' / 'unlabeled' to read (default: both).
      process_index: which process (default: this one); with `process_count`,
        lets a test build another process's stream.
      process_count: how many processes; its rows per batch are then
        batch_size / process_count.
    """
    interface.check_streams(streams, self._pools, self.config)
    p = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    out = {}
    for i, (stream, pool) in enumerate(self._pools.items()):
      if streams is not None and stream not in streams:
        continue
      bs = self.batch_size if stream == "labeled" else self.unlabeled_batch_size
      local = bs // count if process_count is not None else self._local(bs)
      out[stream] = self._stream(pool, local,
                                 _seed(self.seed, start_step, i, p), p, count)
    return tf.data.Dataset.zip(out).prefetch(tf.data.AUTOTUNE)

  def iterate(self, start_step: int, streams: tuple[str, ...] | None = None,
              prefetch: int = 2) -> Iterator[Any]:
    """Global batches for start_step, start_step + 1, ... (endless).

    The order is seeded by (seed, start_step): a resumed run does not replay
    the batches an uninterrupted run would have seen. `streams` as in
    `host_batches`. `prefetch` is accepted for the in-memory pipeline's
    interface; tf.data prefetches with AUTOTUNE.
    """
    del prefetch
    ds = self.host_batches(start_step, streams)
    return (sharding.to_global(b, self.mesh) for b in ds.as_numpy_iterator())

  # -- evaluation ------------------------------------------------------------

  @property
  def eval_splits(self) -> tuple[str, ...]:
    """The splits evaluated during training: 'test', and 'val' if there is one."""
    return ("test", "val") if len(self.split.val) else ("test",)

  def eval_host_batches(self, split: str, local_batch: int, process_index: int,
                        process_count: int) -> tf.data.Dataset:
    """One process's padded, centre-cropped batches of a whole split.

    'val' reads this process's share of the train split and keeps the
    validation rows (so, like the labeled stream, it reads the whole share).
    Every process gets the same number of batches (from the largest share);
    padded rows have mask False, index 0 and label 0.
    """
    if split not in (*_SPLIT_NAMES, "val"):
      raise R2D2Error(f"Unknown eval split {split!r}: use 'test' (ImageNet's "
                      "validation set), 'val' (data.num_val rows carved from "
                      "the train split) or 'train'.")
    if split == "val" and not len(self.split.val):
      raise R2D2Error("There is no validation set to evaluate: "
                      "data.num_val is 0.")
    name = _SPLIT_NAMES.get(split, "train")
    n, lengths = _split_info(self.builder, name)
    start, stop = process_share(n, process_index, process_count)
    size = self.image_size
    offsets = tf.constant(shard_offsets(lengths), tf.int64)
    if split == "val":
      val = self.split.val
      # Rows of each process's share that are validation rows.
      shares = [process_share(n, p, process_count)
                for p in range(process_count)]
      kept = [int(np.sum((val >= a) & (val < b))) for a, b in shares]
      mine, most = kept[process_index], max(kept)
      in_val = np.zeros(n, bool)
      in_val[val] = True
      table = tf.constant(in_val)
    else:
      largest = process_share(n, 0, process_count)
      mine, most = stop - start, largest[1] - largest[0]
    num_batches = -(-most // local_batch)

    def prep(ex):
      return {"image": eval_crop(ex["image"], size),
              "label": tf.cast(ex["label"], tf.int32),
              "index": tf.cast(tfds_id_to_index(ex["tfds_id"], offsets),
                               tf.int32),
              "mask": tf.constant(True)}

    pad = {"image": tf.zeros([size, size, 3], tf.uint8),
           "label": tf.constant(0, tf.int32), "index": tf.constant(0, tf.int32),
           "mask": tf.constant(False)}
    padding = tf.data.Dataset.from_tensors(pad).repeat(
        num_batches * local_batch - mine)
    if mine:
      ds = _read(self.builder, _slice(name, start, stop))
      if split == "val":
        ds = ds.filter(lambda ex: tf.gather(
            table, tfds_id_to_index(ex["tfds_id"], offsets)))
      ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE)
      ds = ds.concatenate(padding)
    else:
      ds = padding
    return ds.batch(local_batch).prefetch(tf.data.AUTOTUNE)

  def eval_batches(self, split: str, batch_size: int) -> Iterator[Any]:
    """The whole split exactly once, padded to full batches, with a mask.

    Args:
      split: 'test' (ImageNet's validation set), 'val' (the `data.num_val`
        validation rows carved from the train split, centre-cropped) or
        'train' (the whole train split, centre-cropped, e.g. to predict a
        per-example table).
      batch_size: global batch size (divisible by the device count).

    Yields:
      Global {'image', 'label', 'index', 'mask'} batches; padded rows have
      mask 0. Every process yields the same number of batches.
    """
    sharding.check_batch_size("data.eval_batch_size", batch_size, self.mesh)
    ds = self.eval_host_batches(split, self._local(batch_size),
                                jax.process_index(), jax.process_count())
    for batch in ds.as_numpy_iterator():
      yield sharding.to_global(batch, self.mesh)
