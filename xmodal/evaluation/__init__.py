"""Evaluation internals: retrieval metrics, ITM re-ranking, embedding a split, zero-shot classification.

`xmodal.evaluate` is the public entry; it re-exports what the CLI calls and ties the pieces together.
"""
