"""``python -m parcae`` (used under torchrun) is the ``parcae`` command."""

from parcae.cli import main

main()
