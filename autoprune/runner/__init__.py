"""The search runner: experiment configs, runs of searchers x seeds (their crash journal and
latency clock check), sweeps."""
