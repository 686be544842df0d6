"""The pruning engine: units of a model and their analytic costs, criteria, and channel surgery."""
