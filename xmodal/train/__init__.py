"""Training: state born sharded, optimizer, the jitted step, checkpoints, and the loop that joins them."""
