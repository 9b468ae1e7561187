"""Input data: sources, preprocessing, tokenization and the training/evaluation pipelines.

The only package that imports TensorFlow, and only inside the modules that need it: importing `xmodal.data` or
`xmodal.data.config` does not import TensorFlow. Entry points: `xmodal.data.config.data_config`,
`xmodal.data.pipeline.train_iterator` / `eval_iterator`; `xmodal.sharding.host_to_global` puts their batches on the
mesh.
"""
