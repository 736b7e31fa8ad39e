"""`python -m peftu`: the same as the `peftu` command."""

from peftu.cli import main

main()
