"""Costs of a model: MACs and parameters, measured latency, and latency lookup tables."""
