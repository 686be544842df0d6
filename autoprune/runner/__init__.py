"""The search runner: experiment configs, runs of several searchers and seeds, sweeps."""
