"""The data section of an experiment config: every input knob, explicit and documented.

This module must stay importable without TensorFlow: experiment configs (`configs/*.py`) import it, and an
accelerator host that only benchmarks synthetic batches never installs TensorFlow.
"""

from __future__ import annotations

import ml_collections

SOURCES = ('tfds', 'wds', 'tfrecord', 'folder')
TFDS_ACCESS = ('auto', 'random', 'stream')
CAPTION_GROUNDINGS = ('', 'shapes')  # xmodal.data.pipeline's grounders, by name ('' = none)
RELATION_SWAPS = ('', 'shapes')  # xmodal.data.pipeline's relation-swap writers, by name ('' = none)

# ImageNet statistics, what ViT/BERT-style towers pretrained elsewhere expect; scaled to [0, 255] pixels.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def data_config(**overrides) -> ml_collections.ConfigDict:
  """Returns the data config with every field set; `overrides` replace top-level fields (unknown ones raise).

  Fields:
    source: where examples come from, one of SOURCES:
      'tfds'     a tensorflow-datasets builder (`tfds_name`), random access when it is stored as array_record;
      'wds'      WebDataset `.tar` shards (`{key}.jpg|png` + `{key}.txt|json`, what img2dataset writes);
      'tfrecord' TFRecord shards of tf.train.Example (`tfrecord_image_key` + `tfrecord_caption_key`);
      'folder'   a folder of images and a captions file (CSV `image,caption` or JSON lines), rows grouped per image.
    tfds_name: builder name, optionally with version/config ('xmodal_shapes', 'coco_captions/2017').
    tfds_data_dir: tfds data_dir; '' = the tfds default (~/tensorflow_datasets or $TFDS_DATA_DIR).
    tfds_access: 'auto' (random access for array_record datasets, streaming otherwise), 'random' or 'stream'.
    train_split / eval_split: split names (tfds split syntax, e.g. 'train[:90%]'); ignored by shard/folder sources,
      which have `train_*`/`eval_*` paths instead.
    image_key: feature path of the encoded image; nested features are joined with '/' ('image').
    captions_key: feature path of the captions, a string or a sequence of strings ('captions', COCO: 'captions/text').
    id_key: feature path of an integer image id ('image_id', COCO: 'image/id'); '' = the example's position.
    train_shards / eval_shards: glob of shard files for 'wds'/'tfrecord' ('/data/cc3m/{00000..00099}.tar' is not a
      glob: write '/data/cc3m/*.tar').
    wds_image_exts / wds_text_exts: WebDataset member extensions, in order of preference.
    wds_json_caption_keys: keys of a `.json` member that may hold the caption(s), in order of preference.
    tfrecord_image_key / tfrecord_caption_key / tfrecord_id_key: tf.train.Example feature names ('' id = position).
    folder / train_captions / eval_captions: image folder and the captions files (paths in a file are relative to
      `folder`); a file ending in .csv is CSV with a header containing `image,caption`, anything else JSON lines with
      `image` and `caption` (a string) or `captions` (a list).
    image_size: side of the square model input, pixels (in a full config, the same value as model.image_size).
    crop_scale: (min, max) area fraction of the random resized crop used for training.
    crop_ratio: (min, max) aspect ratio of that crop.
    hflip: random horizontal flip for training. Off by default: captions say 'left of'/'right of'.
    grayscale_prob: share of training examples shown in grey, their captions (and written negatives) without the
      words `grayscale_drop_words` (e.g. the colour words): for them, colour cannot tell the batch's images apart.
    mean / std: per-channel normalisation on [0, 255] pixels; output = (pixel - mean) / std, float32.
    tokenizer: spec for `xmodal.tokenizer.load_tokenizer` ('shapes' = the shipped vocabulary, or a path).
    max_text_len: token length L of `text_ids`; longer captions are truncated (in a full config, model.max_text_len).
    max_captions: C, captions kept per image by the evaluation pipeline (COCO and shapes have 5).
    pairs: read examples 2m and 2m+1 of the training split as a unit, side by side in one batch (xmodal_shapes'
      training split is built as minimal pairs: each image's hard negative image is its neighbour); needs a
      random-access source, an even batch per process, and no skipped records (a skip shifts the rest).
    negatives_key: feature path of hard negative captions stored with each training image ('' = none;
      xmodal_shapes: 'negative_captions', one broken fact per caption); each example then carries one of them, for
      `loss.itm_written_negatives` / `loss.itc_written_negatives`. Read by the tfds source (random access).
    region_boxes_key / region_phrases_key: feature paths of each training image's regions: a sequence of boxes
      (tfds BBoxFeature: ymin, xmin, ymax, xmax in [0, 1]) and the phrases naming them, in the same order
      (xmodal_shapes: 'regions/bbox', 'regions/phrase', one per object); '' = none. Read by the tfds source (random
      access), for `loss.region_weight`. The boxes describe the stored image, so they need no crop
      (crop_scale (1, 1)), no flip and no grey examples.
    caption_grounding: how to find which words of a training caption name which of its regions: '' (none) or
      'shapes' (xmodal_shapes' caption grammar, `captions.ground_caption`); needs the regions. Each example then
      carries `text_regions`, every caption token's region index (-1: none), for `loss.locate_weight`, the way MDETR
      grounds Flickr30k's phrases.
    relation_swaps: how to write each training caption's relation swap, the same words with its related phrases
      exchanged ("a red circle left of a blue box" -> "a blue box left of a red circle"): '' (none) or 'shapes'
      (`captions.relation_swap`). Each example then carries `relation_ids`, `relation_mask` and `relation_valid`
      (False where the caption states no relation), for `loss.relation_weight`.
    max_regions: R, regions kept per image (the first R; fewer are padded).
    max_phrase_len: token length of a region's phrase.
    batch_size: global training batch; each of P processes yields batch_size // P.
    eval_batch_size: global evaluation batch (images; each carries up to C captions).
    shuffle_buffer: window of the stateless shuffle applied to streaming sources (wds/tfrecord/tfds stream);
      index-addressable sources are permuted exactly and ignore it.
    cycle_length: shards read concurrently by streaming sources (interleave).
    seed: data seed; the order and every augmentation are a pure function of it.
    num_parallel_calls: threads for decoding and augmentation; -1 = tf.data AUTOTUNE.
    prefetch: batches prepared ahead of the consumer.
    unusable_limit: N; training stops with an error naming the source when N records in a row yield no example
      (no usable caption, an image that does not decode, truncated), as it does for a stream's whole epoch:
      otherwise a wrong key or extension would be read for ever. Far above the runs of bad records a real dataset
      has; the bigger, the later the error (reading N skipped records costs seconds).
  """
  config = ml_collections.ConfigDict(dict(
      source='tfds',
      tfds_name='xmodal_shapes',
      tfds_data_dir='',
      tfds_access='auto',
      train_split='train',
      eval_split='validation',
      image_key='image',
      captions_key='captions',
      id_key='image_id',
      train_shards='',
      eval_shards='',
      wds_image_exts=('jpg', 'jpeg', 'png', 'webp'),
      wds_text_exts=('txt', 'json'),
      wds_json_caption_keys=('caption', 'captions', 'text'),
      tfrecord_image_key='image/encoded',
      tfrecord_caption_key='caption',
      tfrecord_id_key='',
      folder='',
      train_captions='',
      eval_captions='',
      image_size=64,
      crop_scale=(0.5, 1.0),
      crop_ratio=(3 / 4, 4 / 3),
      hflip=False,
      grayscale_prob=0.0,
      grayscale_drop_words=(),
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
      tokenizer='shapes',
      max_text_len=32,
      max_captions=5,
      negatives_key='',
      region_boxes_key='',
      region_phrases_key='',
      caption_grounding='',
      relation_swaps='',
      max_regions=3,
      max_phrase_len=8,
      pairs=False,
      batch_size=256,
      eval_batch_size=256,
      shuffle_buffer=4096,
      cycle_length=8,
      seed=0,
      num_parallel_calls=-1,
      prefetch=2,
      unusable_limit=10_000,
  ))
  for key, value in overrides.items():
    if key not in config:
      raise KeyError(f'unknown data config field {key!r}; valid: {sorted(config.keys())}')
    config[key] = value
  config.lock()
  return config


def coco_captions_config(**overrides) -> ml_collections.ConfigDict:
  """The worked example of a tfds image-text dataset: COCO captions with its nested features."""
  fields = dict(source='tfds', tfds_name='coco_captions', captions_key='captions/text', id_key='image/id',
                train_split='train', eval_split='val', image_size=224)
  fields.update(overrides)
  return data_config(**fields)


def validate_data_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field for choices and ranges that would fail deep inside tf.data."""
  if config.source not in SOURCES:
    raise ValueError(f'data.source: {config.source!r} is not one of {SOURCES}')
  if config.negatives_key and config.source != 'tfds':
    raise ValueError(f'data.negatives_key: {config.negatives_key!r} is read by the tfds source only, not '
                     f'{config.source!r}')
  if bool(config.region_boxes_key) != bool(config.region_phrases_key):
    raise ValueError(f'data.region_boxes_key={config.region_boxes_key!r} and data.region_phrases_key='
                     f'{config.region_phrases_key!r}: regions need both, or neither')
  if config.region_boxes_key:
    if config.source != 'tfds':
      raise ValueError(f'data.region_boxes_key: {config.region_boxes_key!r} is read by the tfds source only, not '
                       f'{config.source!r}')
    if tuple(config.crop_scale) != (1.0, 1.0) or config.hflip or config.grayscale_prob:
      raise ValueError(f'data.region_boxes_key: region boxes describe the stored image; they need '
                       f'data.crop_scale=(1.0, 1.0) (got {tuple(config.crop_scale)}), data.hflip=False (got '
                       f'{config.hflip}) and data.grayscale_prob=0 (got {config.grayscale_prob})')
  if config.caption_grounding not in CAPTION_GROUNDINGS:
    raise ValueError(f'data.caption_grounding: {config.caption_grounding!r} is not one of {CAPTION_GROUNDINGS}')
  if config.caption_grounding and not config.region_boxes_key:
    raise ValueError(f'data.caption_grounding: {config.caption_grounding!r} grounds captions in their regions; set '
                     f'data.region_boxes_key and data.region_phrases_key')
  if config.relation_swaps not in RELATION_SWAPS:
    raise ValueError(f'data.relation_swaps: {config.relation_swaps!r} is not one of {RELATION_SWAPS}')
  if config.relation_swaps and config.grayscale_prob:
    raise ValueError(f'data.relation_swaps: {config.relation_swaps!r} reads captions by their grammar, which grey '
                     f'examples lose words of; needs data.grayscale_prob=0 (got {config.grayscale_prob})')
  if config.tfds_access not in TFDS_ACCESS:
    raise ValueError(f'data.tfds_access: {config.tfds_access!r} is not one of {TFDS_ACCESS}')
  if not 0 <= config.grayscale_prob <= 1:
    raise ValueError(f'data.grayscale_prob: {config.grayscale_prob} is not in [0, 1]')
  if config.grayscale_prob and not config.grayscale_drop_words:
    raise ValueError('data.grayscale_prob: grey images need data.grayscale_drop_words (the colour words their '
                     'captions must lose)')
  low, high = config.crop_scale
  if not 0 < low <= high <= 1:
    raise ValueError(f'data.crop_scale: {tuple(config.crop_scale)} is not 0 < min <= max <= 1')
  if len(config.mean) != 3 or len(config.std) != 3 or min(config.std) <= 0:
    raise ValueError('data.mean/data.std: need 3 channels and std > 0')
  for name in ('image_size', 'max_text_len', 'max_captions', 'max_regions', 'max_phrase_len', 'batch_size',
               'eval_batch_size', 'cycle_length', 'unusable_limit'):
    if config[name] <= 0:
      raise ValueError(f'data.{name}: must be positive, got {config[name]}')
