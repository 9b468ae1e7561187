"""Training: the objective, state born sharded, optimizer, the jitted step, checkpoints and the loop that joins them;
a run's workdir read back (run.py), its evaluation and curves, and the step's benchmark (bench.py)."""
