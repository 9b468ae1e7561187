"""Captions of shapes scenes: five COCO-like descriptions per image, and Winoground-style hard negatives.

Every noun phrase reads `determiner [size] colour shape` ("a small red circle", "one blue box"), so the colour word is
always the one just before the shape word; sentence templates, synonyms and word order vary around it. A caption
only states what is in its scene: each phrase names an object that is there, a relation word joins the scene's
related pair in its true direction, a count word ("two", "only") matches the number of objects.

A hard negative keeps a true caption's words and breaks one binding: it swaps the colour words of the two phrases
("a blue circle left of a red box") or swaps the two phrases, reversing the relation ("a red box left of a blue
circle"). It is kept only if no pair of objects in the scene satisfies it, even in the loosest reading.

Pure Python + numpy: the tokenizer builds its vocabulary from `vocabulary()` without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from collections.abc import Iterator, Sequence

import numpy as np

from xmodal.data.shapes.render import COLORS, INVERSE, Obj, Scene, perturbations, relation_holds

# Synonyms; the first is the canonical name used in the metadata.
COLOR_WORDS: dict[str, tuple[str, ...]] = {c: (c,) for c in COLORS} | {'gray': ('gray', 'grey')}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    'circle': ('circle', 'disk'), 'square': ('square', 'box', 'block'), 'triangle': ('triangle',),
    'star': ('star',), 'cross': ('cross',), 'diamond': ('diamond', 'rhombus'),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {'small': ('small', 'little', 'tiny'), 'large': ('large', 'big')}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    'left': ('to the left of', 'left of', 'on the left of'),
    'right': ('to the right of', 'right of', 'on the right of'),
    'above': ('above', 'over', 'on top of'),
    'below': ('below', 'under', 'beneath', 'underneath'),
}
DETERMINERS = ('a', 'one')

# {X} {R} {Y}: the related pair and a relation phrase; {Z}: the third object; {A}, {B}, {C}: all objects, any order.
_ONE = ('{A}', 'there is {A}', '{A} on a dark background', 'a picture of {A}', 'an image of {A}',
        'a drawing of {A}', '{A} in the picture', 'only {A}', 'just {A}')
_RELATED = ('{X} {R} {Y}', '{X} is {R} {Y}', 'there is {X} {R} {Y}', 'a picture of {X} {R} {Y}',
            'an image where {X} is {R} {Y}', 'a drawing of {X} {R} {Y}')
_TWO = _RELATED + ('{A} and {B}', 'two shapes, {A} and {B}', 'two objects: {A} and {B}')
_THREE = _RELATED + ('{X} {R} {Y}, and {Z}', '{X} is {R} {Y}, and there is also {Z}',
                     'there is {Z}, and {X} is {R} {Y}', '{X} {R} {Y}, plus {Z}', '{A}, {B} and {C}',
                     'three shapes, {A}, {B} and {C}')
TEMPLATES: dict[int, tuple[str, ...]] = {1: _ONE, 2: _TWO, 3: _THREE}


@dataclasses.dataclass(frozen=True)
class Phrase:
  """A noun phrase: determiner, optional size word, colour word, shape word (all surface words)."""
  det: str
  size: str | None
  color: str
  shape: str

  def words(self) -> list[str]:
    return [self.det] + ([self.size] if self.size else []) + [self.color, self.shape]

  def canonical(self) -> tuple[str, str, str | None]:
    """(colour, shape, size or None) as metadata names: 'grey' -> 'gray', 'box' -> 'square', 'big' -> 'large'."""
    size = _canonical(self.size, SIZE_WORDS) if self.size else None
    return _canonical(self.color, COLOR_WORDS), _canonical(self.shape, SHAPE_WORDS), size


def _canonical(word: str, table: dict[str, tuple[str, ...]]) -> str:
  return _CANONICAL[id(table)][word]


# word -> canonical name, per synonym table (a dict lookup: the oracle and the negative writer call this millions of
# times).
_CANONICAL = {id(table): {w: k for k, words in table.items() for w in words}
              for table in (COLOR_WORDS, SHAPE_WORDS, SIZE_WORDS, RELATION_PHRASES)}


def phrase_matches(p: Phrase, o: Obj) -> bool:
  """Whether the phrase describes the object (a phrase without size fits either size)."""
  return (_canonical(p.color, COLOR_WORDS) == o.color and _canonical(p.shape, SHAPE_WORDS) == o.shape
          and (p.size is None or _canonical(p.size, SIZE_WORDS) == o.size))


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
  return options[rng.integers(len(options))]


def _phrase(o: Obj, rng: np.random.Generator) -> Phrase:
  size = _pick(rng, SIZE_WORDS[o.size]) if rng.random() < 0.5 else None
  det = 'one' if rng.random() < 0.2 else 'a'  # 'one' now and then, as people write
  return Phrase(det, size, _pick(rng, COLOR_WORDS[o.color]), _pick(rng, SHAPE_WORDS[o.shape]))


def _fill(template: str, slots: dict[str, str]) -> str:
  return template.format(**slots)


def _related(scene: Scene, rng: np.random.Generator) -> tuple[Phrase, str, Phrase, str]:
  """The related pair in a random order: (first phrase, predicate read first → second, second phrase, phrase)."""
  s, predicate, o = scene.relation
  first, second = scene.objects[s], scene.objects[o]
  if rng.random() < 0.5:  # "B right of A" says the same as "A left of B"
    first, second, predicate = second, first, INVERSE[predicate]
  return _phrase(first, rng), predicate, _phrase(second, rng), _pick(rng, RELATION_PHRASES[predicate])


def caption(scene: Scene, rng: np.random.Generator) -> str:
  """One true caption of the scene, drawn from the templates for its object count."""
  template = _pick(rng, TEMPLATES[len(scene.objects)])
  slots = {}
  order = rng.permutation(len(scene.objects))
  for slot, i in zip('ABC', order):
    slots[slot] = ' '.join(_phrase(scene.objects[i], rng).words())
  if scene.relation is not None:
    x, _, y, r = _related(scene, rng)
    slots |= {'X': ' '.join(x.words()), 'R': r, 'Y': ' '.join(y.words())}
    others = [i for i in range(len(scene.objects)) if i not in (scene.relation[0], scene.relation[2])]
    if others:
      slots['Z'] = ' '.join(_phrase(scene.objects[others[0]], rng).words())
  return _fill(template, slots)


def captions(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
  """n different true captions (different wording; a caption repeats only if the grammar runs out, never here)."""
  out: list[str] = []
  for _ in range(50 * n):
    c = caption(scene, rng)
    if c not in out:
      out.append(c)
      if len(out) == n:
        return out
  return out + [out[i % len(out)] for i in range(n - len(out))]


def captions_false_of(scene: Scene, other: Scene, rng: np.random.Generator, n: int = 5) -> list[str] | None:
  """n different true captions of `scene` that are all false of `other` (its minimal pair); None if the grammar
  gives none (e.g. a pair whose difference is a relation, and only relation-free templates drawn)."""
  out: list[str] = []
  for _ in range(50 * n):
    c = caption(scene, rng)
    if c not in out and not caption_fits(c, other):
      out.append(c)
      if len(out) == n:
        return out
  return out + [out[i % len(out)] for i in range(n - len(out))] if out else None


def minimal_pair(scene: Scene, texts: list[str], rng: np.random.Generator, image_size: int
                 ) -> tuple[str, Scene, list[str]] | None:
  """A scene one fact away from `scene` of which every caption in `texts` is false, and captions of it that are
  false of `scene`: (kind, partner, partner captions), or None when no perturbation makes all of `texts` false.

  The perturbation's kind is drawn uniformly among those available (`shapes_render.perturbations`), so colour
  changes, which are the most numerous, do not crowd out shapes, bindings and relations.
  """
  by_kind: dict[str, list[Scene]] = {}
  for kind, partner in perturbations(scene, image_size):
    by_kind.setdefault(kind, []).append(partner)
  kinds = sorted(by_kind)
  for k in rng.permutation(len(kinds)):
    candidates = by_kind[kinds[k]]
    for c in rng.permutation(len(candidates)):
      partner = candidates[c]
      if any(caption_fits(t, partner) for t in texts):
        continue
      partner_texts = captions_false_of(partner, scene, rng, len(texts))
      if partner_texts is not None:
        return kinds[k], partner, partner_texts
  return None


def statement_holds(scene: Scene, first: Phrase, predicate: str, second: Phrase, *, strict: bool) -> bool:
  """Whether some pair of distinct objects fits "first <predicate> second" (strict or loosest relation reading)."""
  return any(relation_holds(a, predicate, b, strict=strict) for a, b in _named_pairs(scene, first, second))


def _named_pairs(scene: Scene, first: Phrase, second: Phrase) -> Iterator[tuple[Obj, Obj]]:
  """The pairs of distinct objects of the scene that the two phrases describe, in that order."""
  return ((a, b) for a, b in itertools.product(scene.objects, repeat=2)
          if a is not b and phrase_matches(first, a) and phrase_matches(second, b))


def hard_pair(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str] | None:
  """A true caption, its hard negative and the broken binding ('colors' or 'relation'); None if none is safe.

  The negative has the same words as the positive with either the two colour words swapped or the two noun phrases
  swapped (which reverses the relation). None when the scene has no relation or every candidate negative would
  still be true of some pair of objects in the scene.
  """
  if scene.relation is None:
    return None
  x, predicate, y, rel = _related(scene, rng)
  template = _pick(rng, _RELATED)
  negatives = []
  if _canonical(x.color, COLOR_WORDS) != _canonical(y.color, COLOR_WORDS):
    negatives.append(('colors', dataclasses.replace(x, color=y.color), dataclasses.replace(y, color=x.color)))
  negatives.append(('relation', dataclasses.replace(y, det=x.det), dataclasses.replace(x, det=y.det)))
  if rng.random() < 0.5:
    negatives.reverse()
  positive = _fill(template, {'X': ' '.join(x.words()), 'R': rel, 'Y': ' '.join(y.words())})
  for kind, nx, ny in negatives:
    if not statement_holds(scene, nx, predicate, ny, strict=False):
      return positive, _fill(template, {'X': ' '.join(nx.words()), 'R': rel, 'Y': ' '.join(ny.words())}), kind
  return None


def binding_kind(scene: Scene, negative: str) -> str:
  """Which binding a `hard_pair` negative breaks, in the scene it is false of: 'relation' when each of its two noun
  phrases names a distinct object of the scene, so that only where they are is wrong; 'colours' when a phrase names
  no object (a colour put on the other object's shape or size).

  A colour swap between objects that differ only in colour ("a blue circle left of a red circle" of a red circle left
  of a blue one) is a relation reversal: the same two objects, the other way round. Such pairs are one in seven
  colour swaps (69 of validation_hard's 485), and a model that binds colours without knowing where things are can
  only guess them.
  """
  statement = next((s for s in parse_caption(negative) if s.relation is not None), None)
  if statement is None:
    raise ValueError(f'not a hard pair: {negative!r} states no relation')
  subject, _, obj = statement.relation
  named = _named_pairs(scene, statement.phrases[subject], statement.phrases[obj])
  return 'relation' if any(True for _ in named) else 'colours'


@dataclasses.dataclass(frozen=True)
class Statement:
  """What one reading of a caption states.

  phrases: the noun phrases in the order their slots appear in the template (surface words, as generated).
  relation: (index of the subject phrase, canonical predicate, index of the object phrase), e.g. (0, 'left', 1) for
    "phrases[0] is left of phrases[1]"; None when the template has no relation.
  counts: the object counts the template is used for ({1} for "only {A}", {2, 3} for "{X} {R} {Y}").
  """
  phrases: tuple[Phrase, ...]
  relation: tuple[int, str, int] | None
  counts: frozenset[int]


_SLOT = re.compile(r'\{([A-Z])\}')


def _alternatives(table: dict[str, tuple[str, ...]]) -> str:
  return '|'.join(re.escape(w) for words in table.values() for w in words)


def _phrase_pattern(slot: str) -> str:
  det = '|'.join(map(re.escape, DETERMINERS))
  return (f'(?P<{slot}_det>{det}) (?:(?P<{slot}_size>{_alternatives(SIZE_WORDS)}) )?'
          f'(?P<{slot}_color>{_alternatives(COLOR_WORDS)}) (?P<{slot}_shape>{_alternatives(SHAPE_WORDS)})')


@functools.cache
def _readers() -> tuple[tuple[re.Pattern, tuple[str, ...], frozenset[int]], ...]:
  """(full-caption regex, slots in template order, allowed object counts) for every distinct template."""
  readers = []
  for template in dict.fromkeys(itertools.chain.from_iterable(TEMPLATES.values())):
    parts = []
    for k, piece in enumerate(_SLOT.split(template)):  # odd pieces are slot names
      if k % 2 == 0:
        parts.append(re.escape(piece))
      else:
        parts.append(f'(?P<R>{_alternatives(RELATION_PHRASES)})' if piece == 'R' else _phrase_pattern(piece))
    counts = frozenset(n for n, templates in TEMPLATES.items() if template in templates)
    readers.append((re.compile(''.join(parts)), tuple(_SLOT.findall(template)), counts))
  return tuple(readers)


def parse_caption(text: str) -> tuple[Statement, ...]:
  """Every reading of a caption under the templates (usually one), in template order; ValueError if none.

  A template matches a caption at most one way: every phrase ends with a shape word that no template's own words
  contain, so where each slot ends is fixed.
  """
  statements: dict[Statement, None] = {}
  for regex, slots, counts in _readers():
    m = regex.fullmatch(text)
    if m is not None:
      statements[_statement(m, slots, counts)] = None
  if not statements:
    raise _unreadable(text)
  return tuple(statements)


def _statement(m: re.Match, slots: tuple[str, ...], counts: frozenset[int]) -> Statement:
  """The statement of one template's match."""
  names = [s for s in slots if s != 'R']
  phrases = tuple(Phrase(m[f'{s}_det'], m[f'{s}_size'], m[f'{s}_color'], m[f'{s}_shape']) for s in names)
  relation = None
  if 'R' in slots:
    relation = (names.index('X'), _canonical(m['R'], RELATION_PHRASES), names.index('Y'))
  return Statement(phrases, relation, counts)


def statement_fits(statement: Statement, scene: Scene) -> bool:
  """Whether the scene makes every fact of the statement true.

  The object count is one the template allows; the phrases name pairwise distinct objects (colour, shape and any
  size match); the relation holds between the subject's and object's objects in its loosest reading.
  """
  if len(scene.objects) not in statement.counts:
    return False
  for chosen in itertools.permutations(scene.objects, len(statement.phrases)):
    if not all(phrase_matches(p, o) for p, o in zip(statement.phrases, chosen)):
      continue
    if statement.relation is None:
      return True
    x, predicate, y = statement.relation
    if relation_holds(chosen[x], predicate, chosen[y], strict=False):
      return True
  return False


def caption_fits(text_or_statements: str | tuple[Statement, ...], scene: Scene) -> bool:
  """Whether some reading of the caption (a string, or `parse_caption`'s readings) fits the scene."""
  statements = parse_caption(text_or_statements) if isinstance(text_or_statements, str) else text_or_statements
  return any(statement_fits(s, scene) for s in statements)


def _first_reading(text: str) -> tuple[re.Match, tuple[str, ...], frozenset[int]] | None:
  """The first template's match of a caption, its slots and object counts; None if no template reads it."""
  for regex, slots, counts in _readers():
    m = regex.fullmatch(text)
    if m is not None:
      return m, slots, counts
  return None


def _unreadable(text: str) -> ValueError:
  return ValueError(f'caption {text!r} has no reading under the shapes caption templates')


def _read(text: str) -> tuple[re.Match, tuple[str, ...], frozenset[int]]:
  """`_first_reading`, or ValueError naming the caption if no template reads it."""
  reading = _first_reading(text)
  if reading is None:
    raise _unreadable(text)
  return reading


@functools.cache
def _region_reader() -> re.Pattern:
  return re.compile(_phrase_pattern('P'))


def ground_caption(text: str, region_phrases: Sequence[str]) -> list[tuple[int, int, int]]:
  """Which characters of a caption name which region: (start, end, region index) per noun phrase, the way MDETR's
  `tokens_positive` ground Flickr30k's phrases in their boxes.

  A phrase names the region whose phrase (the builder's canonical "a small red circle") has its colour and shape: a
  scene's colour-shape pairs are distinct, so that region is the phrase's object. Phrases that name no region, and
  captions the templates cannot read (one stripped of its colour words, say), give no spans.
  """
  reading = _first_reading(text)
  if reading is None:
    return []
  m, slots, _ = reading
  regions = {}
  for index, phrase in enumerate(region_phrases):
    r = _region_reader().fullmatch(phrase)
    if r is not None:
      regions[_canonical(r['P_color'], COLOR_WORDS), _canonical(r['P_shape'], SHAPE_WORDS)] = index
  spans = []
  for slot in slots:
    if slot == 'R':
      continue
    index = regions.get((_canonical(m[f'{slot}_color'], COLOR_WORDS), _canonical(m[f'{slot}_shape'], SHAPE_WORDS)))
    if index is not None:
      spans.append((m.start(f'{slot}_det'), m.end(f'{slot}_shape'), index))
  return sorted(spans)


@dataclasses.dataclass(frozen=True)
class NamedObject:
  """A noun phrase of a caption: where its colour and shape words are (character spans) and what they name."""
  color_span: tuple[int, int]
  shape_span: tuple[int, int]
  color: str  # canonical, as the scene's metadata names it
  shape: str


def named_objects(text: str) -> list[NamedObject]:
  """Every noun phrase of a caption, in the order written ([] for a caption the templates cannot read): what the
  pointing test (xmodal.evaluation.pointing) asks a word's heatmap to find. A scene's colour-shape pairs are
  distinct, so (color, shape) names one object."""
  reading = _first_reading(text)
  if reading is None:
    return []
  m, slots, _ = reading
  return [NamedObject(m.span(f'{slot}_color'), m.span(f'{slot}_shape'), _canonical(m[f'{slot}_color'], COLOR_WORDS),
                      _canonical(m[f'{slot}_shape'], SHAPE_WORDS)) for slot in slots if slot != 'R']


NEGATIVE_KINDS = ('colours', 'relation', 'shape', 'colour')


def negative_caption(text: str, rng: np.random.Generator, scene: Scene | None = None) -> str | None:
  """A hard negative written from a caption: one fact broken, the rest of the words kept; None if none can be.

  Kinds (NEGATIVE_KINDS), the kind drawn uniformly among those the caption allows, then one edit of that kind:
  - 'colours': the colour words of two phrases swapped, when they differ in colour AND shape ("a red circle and a
    blue box" -> "a blue circle and a red box"): a broken binding, as in `hard_pair`;
  - 'relation': the bodies of the related phrases swapped, determiners kept ("a red circle left of a blue box" ->
    "a blue box left of a red circle");
  - 'shape' / 'colour' (only with the `scene`): one phrase's shape (colour) word replaced by another shape's
    (colour's), kept only if the caption becomes false of the scene.
  The two swaps are false of the caption's scene whatever the scene: its colour-shape pairs are distinct and at
  most three, so both swapped phrases cannot name objects, and the related pair stands in its relation one way
  only. A substitution could name another object of the scene, hence the check.
  """
  m, slots, counts = _read(text)
  names = [slot for slot in slots if slot != 'R']
  statement = _statement(m, slots, counts)
  edits: dict[str, list[list[tuple[int, int, str]]]] = {kind: [] for kind in NEGATIVE_KINDS}
  for a, b in itertools.combinations(names, 2):
    color_a, color_b = m[f'{a}_color'], m[f'{b}_color']
    if (_canonical(color_a, COLOR_WORDS) != _canonical(color_b, COLOR_WORDS)
        and _canonical(m[f'{a}_shape'], SHAPE_WORDS) != _canonical(m[f'{b}_shape'], SHAPE_WORDS)):
      edits['colours'].append([(*m.span(f'{a}_color'), color_b), (*m.span(f'{b}_color'), color_a)])
  if 'R' in slots:
    edits['relation'].append(_relation_edit(m, text))
  if scene is not None:
    for kind, part, table in (('shape', 'shape', SHAPE_WORDS), ('colour', 'color', COLOR_WORDS)):
      for index, slot in enumerate(names):
        word = m[f'{slot}_{part}']
        for other in table:
          if other == _canonical(word, table):
            continue
          replacement = _pick(rng, table[other])
          # The edited statement, checked without re-parsing its text.
          phrases = list(statement.phrases)
          phrases[index] = dataclasses.replace(phrases[index], **{part: replacement})
          if not statement_fits(dataclasses.replace(statement, phrases=tuple(phrases)), scene):
            edits[kind].append([(*m.span(f'{slot}_{part}'), replacement)])
  kinds = [kind for kind in NEGATIVE_KINDS if edits[kind]]
  if not kinds:
    return None
  options = edits[kinds[rng.integers(len(kinds))]]
  return _apply(text, options[rng.integers(len(options))])


def _relation_edit(m: re.Match, text: str) -> list[tuple[int, int, str]]:
  """The edit that swaps the bodies of a reading's related phrases X and Y, their determiners kept."""
  body = lambda slot: (m.end(f'{slot}_det') + 1, m.end(f'{slot}_shape'))
  (x0, x1), (y0, y1) = body('X'), body('Y')
  return [(x0, x1, text[y0:y1]), (y0, y1, text[x0:x1])]


def relation_swap(text: str) -> str:
  """The caption with its related phrases swapped ("a red circle left of a blue box" -> "a blue box left of a red
  circle"): the same words, false of any scene the caption is true of (`negative_caption`'s 'relation' kind); ''
  when the caption states no relation. Raises on a caption outside the templates."""
  m, slots, _ = _read(text)
  return _apply(text, _relation_edit(m, text)) if 'R' in slots else ''


def _apply(text: str, edits: list[tuple[int, int, str]]) -> str:
  """`text` with each (start, end) span replaced; spans do not overlap."""
  out, last = [], 0
  for start, end, replacement in sorted(edits):
    out += [text[last:start], replacement]
    last = end
  return ''.join(out + [text[last:]])


def vocabulary() -> list[str]:
  """Every word and punctuation mark the caption grammar can produce, sorted (for the shipped WordPiece vocab)."""
  words: set[str] = set(DETERMINERS)
  for table in (COLOR_WORDS, SHAPE_WORDS, SIZE_WORDS, RELATION_PHRASES):
    for options in table.values():
      for option in options:
        words.update(option.split())
  for template in itertools.chain.from_iterable(TEMPLATES.values()):
    for token in template.replace(',', ' , ').replace(':', ' : ').split():
      if not token.startswith('{'):
        words.add(token)
  return sorted(words)
