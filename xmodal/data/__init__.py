"""Input data: sources, preprocessing, tokenization and the training/evaluation pipelines.

The only package that imports TensorFlow, and only inside the modules that need it: importing `xmodal.data`,
`xmodal.data.config` or `xmodal.data.device` does not import TensorFlow. Entry points:
`xmodal.data.config.data_config`, `xmodal.data.pipeline.train_iterator` / `eval_iterator`,
`xmodal.data.device.host_to_global`.
"""
