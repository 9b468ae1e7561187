"""Input data with tf.data: sources, preprocessing, the training/evaluation pipelines, the shapes dataset, the bench.

The only package that imports TensorFlow, and only inside the modules that need it: importing `xmodal.data` or
`xmodal.data.shapes` does not import TensorFlow. Entry points: `xmodal.data.pipeline.train_iterator` /
`eval_iterator`; their settings are `xmodal.config.data`, their tokenizer `xmodal.tokenizer`, and
`xmodal.sharding.host_to_global` puts their batches on the mesh.
"""
