"""The published benchmark: a typed plan of groups (model, granularity, budget), run resumably.

``plan`` (the YAML plan and its groups), ``data`` (the plan's data on this machine), ``run``
(groups run and recorded, resume), ``records`` (the records file), ``latency`` (the pruned
models timed against the dense one), ``report`` (tables, verdicts, report files) and
``estimate`` (the plan's predicted time). ``autoprune bench`` is the command; nothing here is
imported by the rest of the library.
"""
