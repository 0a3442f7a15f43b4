"""``python -m jimray`` is the ``jimray`` command."""

from jimray.cli.app import main

main()
