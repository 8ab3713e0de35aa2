"""Processes and nodes: Fabric strategies (incl. the chunked all-reduce), SLURM, signals."""
