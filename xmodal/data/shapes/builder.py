"""`xmodal_shapes`: the embedded default dataset, rendered locally as a tfds dataset (no download).

Images of 1-3 coloured shapes with 5 captions each, and `validation_hard` / `test_hard` splits of (true caption, hard
negative) pairs that differ by one broken binding (the first to choose recipes on, the second to report). Build and
read:

  builder = XmodalShapes(data_dir=DIR)            # or config=shapes_config(seed=1, train_size=40, ...)
  builder.download_and_prepare()                  # 23k images: ~75 CPU-seconds, spread over the cores
  source = builder.as_data_source(split='train')  # array_record: source[i] is record i, len(source) is the size
  ds = builder.as_dataset(split='train')          # or a tf.data pipeline
  scenes, captions = load_split('test')           # what each image shows and says, for the oracle ceiling

Record i of a split is image i (`image_id` = i; shuffling is disabled), so a reader can resume at any index.
Every example draws from its own generator seeded by (seed, split, index): a build is deterministic, and a split's
first k examples do not depend on the split's size.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import io
import multiprocessing
import os
from typing import Any, Iterator

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from xmodal.data.shapes import captions as shapes_captions, render as shapes_render

# Split codes seed the per-example generators; they never change, so image i of a split is the same in every build.
_SPLIT_CODES = {'train': 0, 'validation': 1, 'test': 2, 'test_hard': 3, 'validation_hard': 4}
HARD_SPLITS = ('validation_hard', 'test_hard')
NUM_CAPTIONS = 5


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """Seed, image side and split sizes. Each distinct config needs its own `name` (its data lives under it)."""
  seed: int = 0
  image_size: int = 64
  train_size: int = 20_000
  validation_size: int = 1_000
  test_size: int = 1_000
  test_hard_size: int = 1_000
  validation_hard_size: int = 1_000
  # Training images 2k and 2k+1 are a minimal pair (`shapes_captions.minimal_pair`): one fact apart, each image's
  # captions false of the other. A reader that keeps pairs in one batch (data.pairs) gives contrastive learning
  # negatives that differ in a shape, a colour, a binding or a relation, which colours alone cannot tell apart.
  train_pairs: bool = True


def shapes_config(seed: int = 0, image_size: int = 64, train_size: int = 20_000, validation_size: int = 1_000,
                  test_size: int = 1_000, test_hard_size: int = 1_000, validation_hard_size: int = 1_000,
                  train_pairs: bool = True) -> ShapesConfig:
  """A config named after its values (e.g. 's1_64px_40_10_10_10_10'), so different configs never share a folder."""
  sizes = (train_size, validation_size, test_size, test_hard_size, validation_hard_size)
  name = f's{seed}_{image_size}px_' + '_'.join(map(str, sizes)) + ('' if train_pairs else '_unpaired')
  return ShapesConfig(name=name, seed=seed, image_size=image_size, train_size=train_size,
                      validation_size=validation_size, test_size=test_size, test_hard_size=test_hard_size,
                      validation_hard_size=validation_hard_size, train_pairs=train_pairs)


def _jpeg(image: np.ndarray) -> bytes:
  # Encoded here rather than by tfds: PIL is several times faster than a TF op per image. JPEG rather than PNG: it
  # decodes about twice as fast, and decoding is the input pipeline's largest cost; quality 95 without chroma
  # subsampling keeps the colours of small shapes (which captions name) intact.
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='JPEG', quality=95, subsampling=0)
  return buffer.getvalue()


def _metadata(scene: shapes_render.Scene) -> dict[str, Any]:
  objects = scene.objects
  subject, predicate, obj = scene.relation if scene.relation else (-1, 'none', -1)
  return {
      'objects': {
          'color': [o.color for o in objects], 'shape': [o.shape for o in objects],
          'size': [o.size for o in objects], 'x': np.array([o.x for o in objects], np.float32),
          'y': np.array([o.y for o in objects], np.float32),
          'radius': np.array([o.radius for o in objects], np.float32),
      },
      'relation': {'predicate': predicate, 'subject': subject, 'object': obj},
  }


def _regions(scene: shapes_render.Scene, image_size: int) -> dict[str, Any]:
  """Each object's bounding box (tfds order: ymin, xmin, ymax, xmax, as fractions of the side) and the phrase that
  names it ("a small red circle"): what region-phrase alignment (`loss.region_weight`) learns from."""
  def box(o: shapes_render.Obj) -> tfds.features.BBox:
    lo = lambda v: float(np.clip((v - o.radius) / image_size, 0.0, 1.0))
    hi = lambda v: float(np.clip((v + o.radius) / image_size, 0.0, 1.0))
    return tfds.features.BBox(ymin=lo(o.y), xmin=lo(o.x), ymax=hi(o.y), xmax=hi(o.x))
  return {'regions': {'bbox': [box(o) for o in scene.objects],
                      'phrase': [f'a {o.size} {o.color} {o.shape}' for o in scene.objects]}}


def _labels(names: tuple[str, ...]) -> tfds.features.ClassLabel:
  return tfds.features.ClassLabel(names=list(names))


def make_example(config: ShapesConfig, split: str, index: int) -> dict[str, Any]:
  """Example `index` of `split`: a pure function of (config.seed, config.image_size, split, index).

  Hard-pair scenes (`validation_hard`, `test_hard`) always hold 2-3 objects (a binding needs two), and a scene
  whose every candidate negative would still be true of it is redrawn from the same generator. With
  `config.train_pairs`, training image 2k+1 is the minimal pair of image 2k (drawn from generators of its own; an
  independent scene when image 2k has none). Training examples also carry `negative_captions`: for each caption,
  one with a fact broken (`shapes_captions.negative_caption`), '' where none can be written.
  """
  code = _SPLIT_CODES[split]
  paired = split == 'train' and config.train_pairs
  rng = np.random.default_rng([config.seed, code, index // 2, 0] if paired else [config.seed, code, index])
  if split not in HARD_SPLITS:
    scene = shapes_render.sample_scene(rng, config.image_size)
    texts, negative = shapes_captions.captions(scene, rng, NUM_CAPTIONS), ''
    if paired and index % 2:
      rng = np.random.default_rng([config.seed, code, index // 2, 2])
      pair = shapes_captions.minimal_pair(scene, texts, rng, config.image_size)
      if pair is None:
        scene = shapes_render.sample_scene(rng, config.image_size)
        texts = shapes_captions.captions(scene, rng, NUM_CAPTIONS)
      else:
        _, scene, texts = pair
  else:
    pair = None
    while pair is None:
      scene = shapes_render.sample_scene(rng, config.image_size, min_objects=2)
      pair = shapes_captions.hard_pair(scene, rng)
    texts, negative = [pair[0]], pair[1]
  image = shapes_render.render_scene(scene, rng, config.image_size)
  written = []
  if split == 'train':
    # From a generator of their own, so the images and captions are those of earlier versions.
    written_rng = np.random.default_rng([config.seed, _SPLIT_CODES[split], index, 1])
    written = [shapes_captions.negative_caption(t, written_rng, scene) or '' for t in texts]
  return {'image': _jpeg(image), 'image_id': index, 'captions': texts, 'negative_caption': negative,
          'negative_captions': written, **_metadata(scene), **_regions(scene, config.image_size)}


class XmodalShapes(tfds.core.GeneratorBasedBuilder):
  """Procedurally rendered image-caption pairs: coloured shapes, their sizes and one spatial relation."""

  VERSION = tfds.core.Version('1.5.0')
  RELEASE_NOTES = {'1.0.0': 'First release.', '1.1.0': 'Images stored as JPEG (quality 95, 4:4:4): faster to decode.',
                   '1.2.0': 'A validation_hard split: binding pairs to choose recipes on without reading test_hard.',
                   '1.3.0': 'negative_captions: written hard negatives of every training caption.',
                   '1.4.0': 'Training images 2k and 2k+1 are minimal pairs (train_pairs).',
                   '1.5.0': 'regions: each object\'s bounding box and the phrase that names it.'}
  BUILDER_CONFIGS = [ShapesConfig(name='default')]
  # A worker pool only pays for its start-up on big splits.
  MIN_EXAMPLES_PER_WORKER = 1000

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' own lookup imports `importlib_resources`, absent from this environment; the answer is this file anyway.
    return epath.Path(__file__)

  def __init__(self, *, file_format: str | None = None, num_workers: int | None = None, **kwargs: Any):
    """As tfds' builders, plus `num_workers`: processes rendering examples (default: one per core)."""
    # array_record gives random access (`as_data_source`), which lets the input pipeline resume at any index.
    super().__init__(file_format=file_format or 'array_record', **kwargs)
    self._num_workers = num_workers or os.cpu_count() or 1

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split('\n\n')[0],
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 3), dtype=np.uint8, encoding_format='jpeg'),
            'image_id': np.int64,
            'captions': tfds.features.Sequence(tfds.features.Text()),
            'negative_caption': tfds.features.Text(),
            # Training split only: one hard negative per caption ('' where none), false of this image.
            'negative_captions': tfds.features.Sequence(tfds.features.Text()),
            # Centres and bounding radii in pixels of the stored image (x right, y down).
            'objects': tfds.features.Sequence({
                'color': _labels(shapes_render.COLORS), 'shape': _labels(shapes_render.SHAPES),
                'size': _labels(shapes_render.SIZES), 'x': np.float32, 'y': np.float32, 'radius': np.float32,
            }),
            # The objects as regions: a box and the phrase naming it ('a small red circle'), one per object.
            'regions': tfds.features.Sequence({'bbox': tfds.features.BBoxFeature(), 'phrase': tfds.features.Text()}),
            # objects[subject] is `predicate` of objects[object]; 'none' and -1 for a one-object image.
            'relation': {'predicate': _labels(('none',) + shapes_render.RELATIONS), 'subject': np.int32,
                         'object': np.int32},
        }),
        disable_shuffling=True,  # record i = image i: readers shuffle themselves and resume by index
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    del dl_manager  # nothing to download
    c = self.builder_config
    sizes = {'train': c.train_size, 'validation': c.validation_size, 'test': c.test_size,
             'test_hard': c.test_hard_size, 'validation_hard': c.validation_hard_size}
    return {split: self._generate_examples(split, n) for split, n in sizes.items()}

  def _generate_examples(self, split: str, num_examples: int) -> Iterator[tuple[int, dict[str, Any]]]:
    make = functools.partial(make_example, self.builder_config, split)
    workers = min(self._num_workers, num_examples // self.MIN_EXAMPLES_PER_WORKER)
    if workers < 2:
      for index in range(num_examples):
        yield index, make(index)
      return
    # Workers render and JPEG-encode (numpy/PIL only, never TF: forking after TF's import is then safe); this process
    # keeps tfds' serialisation and writing. imap keeps index order.
    with multiprocessing.get_context('fork').Pool(workers) as pool:
      yield from enumerate(pool.imap(make, range(num_examples), chunksize=100))


def prepare_if_missing(data_dir: str | None = None) -> XmodalShapes:
  """The default xmodal_shapes in `data_dir` (tfds' default when empty), rendered first if it is not there yet."""
  builder = XmodalShapes(data_dir=data_dir or None)
  if not builder.is_prepared():
    logging.info('xmodal_shapes is not prepared in %s: rendering it (no download)', builder.data_dir)
    builder.download_and_prepare()
  return builder


def record_scene(record: dict[str, Any]) -> shapes_render.Scene:
  """The scene of a stored record, rebuilt from its `objects` and `relation` metadata (label ids -> names)."""
  o = record['objects']
  objects = tuple(shapes_render.Obj(shapes_render.COLORS[c], shapes_render.SHAPES[s], shapes_render.SIZES[z],
                                    float(x), float(y), float(r))
                  for c, s, z, x, y, r in zip(o['color'], o['shape'], o['size'], o['x'], o['y'], o['radius']))
  rel = record['relation']
  predicate = ('none',) + shapes_render.RELATIONS  # the `relation.predicate` labels of `_info`
  relation = None
  if predicate[rel['predicate']] != 'none':
    relation = (int(rel['subject']), predicate[rel['predicate']], int(rel['object']))
  return shapes_render.Scene(objects, relation)


def load_split(split: str, data_dir: str | None = None, config: ShapesConfig | None = None
               ) -> tuple[list[shapes_render.Scene], list[list[str]]]:
  """The scenes and captions of every image of a prepared split, in image order (scenes[i] is image i's).

  Positions are the stored float32 values. The images themselves are not decoded. FileNotFoundError if the dataset
  is not prepared in `data_dir` (tfds' default when empty).
  """
  builder = XmodalShapes(data_dir=data_dir or None, config=config)
  if not builder.is_prepared():
    raise FileNotFoundError(f'xmodal_shapes ({builder.builder_config.name}) is not prepared in {builder.data_dir}: '
                            f'run its download_and_prepare() (or prepare_if_missing) first')
  return read_split(builder, split)


def read_images(builder: tfds.core.DatasetBuilder, split: str) -> np.ndarray:
  """(n, S, S, 3) uint8: the images of a prepared split (sliced or not), in the order `read_split` reads them."""
  source = builder.as_data_source(split)
  return np.stack([np.asarray(source[i]['image'], np.uint8) for i in range(len(source))])


def _records(builder: tfds.core.DatasetBuilder, split: str) -> Iterator[dict[str, Any]]:
  """The records of a split (sliced or not) in order, images left encoded."""
  source = builder.as_data_source(split, decoders={'image': tfds.decode.SkipDecoding()})
  return (source[i] for i in range(len(source)))


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def read_binding_kinds(builder: tfds.core.DatasetBuilder, split: str) -> dict[int, str]:
  """image_id -> the binding its hard pair breaks (`shapes_captions.binding_kind`), for a hard split (`HARD_SPLITS`,
  sliced or not) of a prepared xmodal_shapes builder."""
  return {int(record['image_id']): shapes_captions.binding_kind(record_scene(record), _text(record['negative_caption']))
          for record in _records(builder, split)}


def read_split(builder: tfds.core.DatasetBuilder, split: str
               ) -> tuple[list[shapes_render.Scene], list[list[str]]]:
  """`load_split` of any prepared xmodal_shapes builder (e.g. `tfds.builder_from_directory` of a version folder);
  `split` may be sliced ('validation[:500]')."""
  scenes, captions = [], []
  for record in _records(builder, split):
    scenes.append(record_scene(record))
    captions.append([_text(c) for c in record['captions']])
  return scenes, captions
