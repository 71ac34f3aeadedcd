"""``python -m ofstitch`` is the ``ofstitch`` command."""

from .cli import main

main()
