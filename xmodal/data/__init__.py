"""Input data: sources, preprocessing, tokenization and the training/evaluation pipelines.

The only package that imports TensorFlow, and only inside the modules that need it: importing `xmodal.data` does not import
TensorFlow. Entry points: `xmodal.data.pipeline.train_iterator` / `eval_iterator` (their settings:
`xmodal.config.data`); `xmodal.sharding.host_to_global` puts their batches on the
mesh.
"""
