"""DDP training from shards (Goyal et al. 2017 recipe). Not built yet: see docs/ARCHITECTURE.md."""
