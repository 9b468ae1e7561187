"""Image and caption preprocessing as pure TensorFlow functions of (input, stateless key).

Every random choice takes an explicit key, a (2,) int64 tensor derived from (seed, epoch, example), so that a pipeline
restarted anywhere reproduces the same crops and captions (`tf.image.stateless_*`, `tf.random.stateless_*`).
Decoding errors are raised by the decode ops, not hidden here: the pipeline drops and counts them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf


def example_key(seed: int | tf.Tensor, epoch: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
  """The stateless key of one example in one epoch: (..., 2) int64, a pure function of (seed, epoch, index).

  Plain arithmetic rather than fold_in: stateless ops hash their key (Philox), so distinct keys give independent
  streams, and two adds per example are far cheaper in a tf.data map than two more random ops.
  """
  first = tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64)
  return tf.stack([first + tf.zeros_like(tf.cast(index, tf.int64)), tf.cast(index, tf.int64) * 4], axis=-1)


def subkey(key: tf.Tensor, purpose: int) -> tf.Tensor:
  """Independent keys for the crop (0), the flip (1) and the caption (2) of one example (purpose < 4)."""
  return key + tf.constant([0, purpose], tf.int64)


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
  """Decodes JPEG/PNG/GIF/BMP/WebP bytes to uint8 (H, W, 3); raises InvalidArgumentError on bad bytes."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _crop_window(shape: tf.Tensor, key: tf.Tensor, scale: Sequence[float], ratio: Sequence[float]) -> tf.Tensor:
  """Samples a random-resized-crop window [y, x, h, w] (4,) int32 inside an image of `shape` (3,)."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=key, min_object_covered=0.0,
      aspect_ratio_range=tuple(ratio), area_range=tuple(scale), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def decode_random_crop(encoded: tf.Tensor, key: tf.Tensor, scale: Sequence[float],
                       ratio: Sequence[float]) -> tf.Tensor:
  """Decodes and takes a random crop of area fraction in `scale`: uint8 (h, w, 3).

  JPEGs decode only the crop window (decode_and_crop_jpeg), which matters at 224 px and above.
  """
  def jpeg():
    window = _crop_window(tf.image.extract_jpeg_shape(encoded), key, scale, ratio)
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

  def other():
    image = decode_rgb(encoded)
    y, x, h, w = tf.unstack(_crop_window(tf.shape(image), key, scale, ratio))
    return image[y:y + h, x:x + w]

  image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def resize(image: tf.Tensor, size: int | Sequence[int], antialias: bool = False) -> tf.Tensor:
  """Bilinear resize of (h, w, 3) to `size` (int = square); float32 in [0, 255].

  Training crops go without antialiasing: it costs 2-3x the whole resize, and random crops of photos are
  downscaled by small factors (small images are upscaled, where it does nothing).
  """
  size = (size, size) if isinstance(size, int) else tuple(size)
  return tf.image.resize(tf.cast(image, tf.float32), size, method='bilinear', antialias=antialias)


def resize_shorter_side(image: tf.Tensor, size: int) -> tf.Tensor:
  """Resizes (h, w, 3) so that its shorter side is `size`, keeping the aspect ratio; float32."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = tf.cast(size, tf.float32) / tf.reduce_min(shape)
  new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
  return tf.image.resize(tf.cast(image, tf.float32), new, method='bilinear', antialias=True)


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """The central (size, size) window of an image at least that large."""
  shape = tf.shape(image)
  top = (shape[0] - size) // 2
  left = (shape[1] - size) // 2
  return image[top:top + size, left:left + size]


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """(pixel - mean) / std per channel on [0, 255] pixels: float32 (H, W, 3)."""
  mean = tf.constant(mean, tf.float32)
  std = tf.constant(std, tf.float32)
  return (tf.cast(image, tf.float32) - mean) / std


def grayscale_coin(keys: tf.Tensor, prob: float) -> tf.Tensor:
  """Whether each example (keys (..., 2)) is shown in grey: a pure function of its key, true with `prob`.

  A fingerprint rather than a stateless random op: the caption side decides per chunk of keys and the image side
  per example, and both must agree.
  """
  fingerprint = tf.strings.to_hash_bucket_fast(
      tf.strings.join([tf.strings.as_string(keys[..., 0]), tf.strings.as_string(keys[..., 1]), 'grey'],
                      separator=':'), num_buckets=1 << 30)
  return tf.cast(fingerprint, tf.float32) < prob * (1 << 30)


def drop_words(texts: tf.Tensor, words: Sequence[str]) -> tf.Tensor:
  """`texts` without the whole words `words` (and the space after each); other spacing as it was."""
  pattern = r'\b(?:' + '|'.join(words) + r')\b ?'
  return tf.strings.strip(tf.strings.regex_replace(texts, pattern, ''))


def train_image(encoded: tf.Tensor, key: tf.Tensor, *, size: int, scale: Sequence[float], ratio: Sequence[float],
                mean: Sequence[float] | None, std: Sequence[float] | None, hflip: bool,
                grayscale_prob: float = 0.0) -> tf.Tensor:
  """Encoded bytes → random resized crop → (optional flip, grey) → normalised float32 (size, size, 3).

  mean=None leaves [0, 255] pixels: the training pipeline normalises whole batches at once, which is cheaper.
  """
  image = resize(decode_random_crop(encoded, subkey(key, 0), scale, ratio), size)
  if grayscale_prob:
    image = tf.cond(grayscale_coin(key, grayscale_prob),
                    lambda: tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image)), lambda: image)
  if hflip:
    flip = tf.random.stateless_uniform([], subkey(key, 1)) < 0.5
    image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
  if mean is not None:
    image = normalize(image, mean, std)
  image.set_shape([size, size, 3])
  return image


def eval_image(encoded: tf.Tensor, *, size: int, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """Encoded bytes → shorter side to `size` → center crop → normalised float32 (size, size, 3)."""
  image = normalize(center_crop(resize_shorter_side(decode_rgb(encoded), size), size), mean, std)
  image.set_shape([size, size, 3])
  return image


def usable_captions(texts: tf.Tensor) -> tf.Tensor:
  """(C,) bool: captions that are not empty once whitespace is stripped."""
  return tf.strings.length(tf.strings.strip(texts)) > 0


def choose_captions(texts: tf.RaggedTensor, keys: tf.Tensor) -> tf.Tensor:
  """One usable caption per row of (N, None) `texts`, chosen by the row's (N, 2) key; '' where a row has none.

  Vectorised over rows. The choice is a 64-bit fingerprint of the key modulo the row's usable captions: a pure
  function of (key, captions), uniform up to 2^-60, and independent of which other rows share the call.
  """
  usable = tf.ragged.map_flat_values(usable_captions, texts)
  count = tf.reduce_sum(tf.cast(usable, tf.int64), axis=1)
  fingerprint = tf.strings.to_hash_bucket_fast(
      tf.strings.join([tf.strings.as_string(keys[:, 0]), tf.strings.as_string(keys[:, 1])], separator=':'),
      num_buckets=np.iinfo(np.int64).max)
  pick = fingerprint % tf.maximum(count, 1)
  # Rank of each usable caption within its row; the chosen one is the row's pick-th.
  flat_usable = usable.flat_values
  rows = usable.value_rowids()
  flat_rank = tf.cumsum(tf.cast(flat_usable, tf.int64), exclusive=True) - tf.gather(
      tf.concat([[0], tf.cumsum(count)], 0), rows)
  chosen = flat_usable & (flat_rank == tf.gather(pick, rows))
  position = tf.math.unsorted_segment_max(tf.where(chosen, tf.range(tf.size(rows, tf.int64), dtype=tf.int64), -1),
                                          rows, tf.shape(count, tf.int64)[0])
  flat = tf.concat([texts.flat_values, ['']], 0)
  return tf.gather(flat, tf.where(position >= 0, position, tf.size(texts.flat_values, tf.int64)))
