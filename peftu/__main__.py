"""`python -m peftu`: the same as the `peftu` command."""

from .cli import main

main()
