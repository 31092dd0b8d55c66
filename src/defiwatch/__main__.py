"""`python -m defiwatch` = the `defiwatch` command."""

from defiwatch.cli import main

main()
