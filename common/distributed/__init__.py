"""Process groups for running one model over several processes (tensor parallelism)."""
