"""``python -m caspian`` is the ``caspian`` command."""

from caspian.cli import main

main()
