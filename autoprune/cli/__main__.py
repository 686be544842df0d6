"""``python -m autoprune.cli``: the same as the ``autoprune`` console script."""

from autoprune.cli import main

main()
