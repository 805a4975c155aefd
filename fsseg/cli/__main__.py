"""``python -m fsseg.cli``: the ``fsseg`` command."""

from fsseg.cli import main

main()
