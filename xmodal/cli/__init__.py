"""The `xmodal` command, one module per subcommand; `main.py` parses and dispatches.

  train.py   xmodal train    a run, from a config file
  eval.py    xmodal eval     a checkpoint's retrieval table
  bench.py   xmodal bench    the jitted train step on synthetic batches
  config.py  xmodal config   the resolved config
  data.py    xmodal data     build | bench | train-tokenizer
  export.py  xmodal export   a checkpoint as an inference bundle
  search.py  xmodal search   a folder searched with a bundle, or its throughput
  console.py where each command's log lines go (console, WORKDIR/log.txt)
  huge_pages.py  the process started again with transparent huge pages for its heap (XLA:CPU's buffers)

train, eval, bench and config add their flags to main's parser and import their heavy dependencies inside `run`, so
that parsing loads no model code; data, export and search parse their own arguments and are imported only when
called, so that `xmodal search` runs from a bundle alone.
"""
