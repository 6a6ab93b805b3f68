"""DDP training from shards (Goyal et al. 2017 recipe): building blocks so far, see docs/ARCHITECTURE.md."""
