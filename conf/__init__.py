"""taxotrain's Hydra configs, installed with the code so every tool finds them from any directory."""
