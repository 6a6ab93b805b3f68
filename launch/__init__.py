"""Entry points that start work (in-process, torchrun, SLURM). Not built yet: see docs/ARCHITECTURE.md."""
