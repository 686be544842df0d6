"""Search agents of autoprune (installed as ``autoprune.agents``)."""
