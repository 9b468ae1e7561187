"""`xmodal data {build,bench,train-tokenizer}`: the data commands (xmodal/cli/main.py dispatches `xmodal data` here)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='xmodal data', description=__doc__)
  commands = parser.add_subparsers(dest='command', required=True)

  build = commands.add_parser('build', help='render and prepare the xmodal_shapes tfds dataset (no download)')
  build.add_argument('--data-dir', '--data_dir', dest='data_dir', default=None, help='tfds data_dir (default: the tfds default)')
  build.add_argument('--seed', type=int, default=0)
  build.add_argument('--image_size', type=int, default=64)
  build.add_argument('--train_size', type=int, default=20_000)
  build.add_argument('--validation_size', type=int, default=1_000)
  build.add_argument('--test_size', type=int, default=1_000)
  build.add_argument('--test_hard_size', type=int, default=1_000)
  build.add_argument('--validation_hard_size', type=int, default=1_000)

  bench = commands.add_parser('bench', help="examples/s (and per core) of a config's training input pipeline")
  bench.add_argument('--config', required=True, help='configs/NAME.py[:arg]')
  bench.add_argument('--batches', type=int, default=50, help='batches per timed run')
  bench.add_argument('--warmup', type=int, default=10)
  bench.add_argument('--repeats', type=int, default=3)
  bench.add_argument('overrides', nargs='*', help='config overrides, --config.data.batch_size=128 or data.x=y')

  tokenizer = commands.add_parser('train-tokenizer', help='train a WordPiece/SentencePiece vocabulary on captions')
  tokenizer.add_argument('--input', required=True, help='text file, one caption per line')
  tokenizer.add_argument('--vocab-size', '--vocab_size', dest='vocab_size', type=int, required=True)
  tokenizer.add_argument('--out', '--out_dir', dest='out_dir', required=True)
  tokenizer.add_argument('--kind', default='wordpiece', choices=('wordpiece', 'sentencepiece'))
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one data command; returns the exit status."""
  args, unknown = _parser().parse_known_args(sys.argv[1:] if argv is None else list(argv))
  if args.command == 'build':
    from xmodal.data.shapes import builder as shapes  # pylint: disable=g-import-not-at-top
    values = dict(seed=args.seed, image_size=args.image_size, train_size=args.train_size,
                  validation_size=args.validation_size, test_size=args.test_size, test_hard_size=args.test_hard_size,
                  validation_hard_size=args.validation_hard_size)
    if all(getattr(shapes.XmodalShapes.BUILDER_CONFIGS[0], k) == v for k, v in values.items()):
      # The default values are the builder's 'default' config: the one `xmodal train` and `data bench` read.
      builder, name = shapes.XmodalShapes(data_dir=args.data_dir), 'xmodal_shapes'
    else:
      config = shapes.shapes_config(**values)
      builder, name = shapes.XmodalShapes(config=config, data_dir=args.data_dir), f'xmodal_shapes/{config.name}'
    builder.download_and_prepare()
    where = f' --config.data.tfds_data_dir={args.data_dir}' if args.data_dir else ''
    print(f'xmodal_shapes prepared in {builder.data_dir} (read it with --config.data.tfds_name={name}{where})')
    return 0
  if args.command == 'bench':
    from xmodal import config as config_lib  # pylint: disable=g-import-not-at-top
    from xmodal.data import bench  # pylint: disable=g-import-not-at-top
    from xmodal.data.faults import DataError  # pylint: disable=g-import-not-at-top
    config = config_lib.load(args.config, list(args.overrides) + unknown)
    try:
      result = bench.bench_pipeline(config.data, batches=args.batches, warmup=args.warmup, repeats=args.repeats)
    except DataError as e:
      print(f'xmodal: data error: {e}', file=sys.stderr)
      return 1
    print(bench.format_result(result))
    print(json.dumps(result))
    return 0
  if args.command == 'train-tokenizer':
    from xmodal import tokenizer  # pylint: disable=g-import-not-at-top
    if unknown:
      raise SystemExit(f'unknown arguments: {unknown}')
    path = tokenizer.train_tokenizer(args.input, args.vocab_size, args.out_dir, kind=args.kind)
    print(f'tokenizer written to {path}')
    return 0
  raise AssertionError(args.command)


if __name__ == '__main__':
  sys.exit(main())
