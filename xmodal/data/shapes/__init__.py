"""`xmodal_shapes`, the embedded default dataset: scenes of coloured shapes, their captions, and the tfds builder.

  render.py    scenes (objects, colours, relations) and their pixels; numpy only
  captions.py  five captions per scene, hard negatives, minimal pairs, and the parser the oracle reads them with
  builder.py   the tfds builder that renders the splits locally (no download); imports tensorflow_datasets
  vocab.py     the shipped tokenizer vocabulary, generated from the caption templates

Importing this package, `render` or `captions` does not import TensorFlow: the oracle (xmodal.evaluation.oracle) reads
scenes without it.
"""
