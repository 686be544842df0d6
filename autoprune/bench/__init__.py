"""The published benchmark: a typed plan of groups (model, granularity, budget), run resumably."""
