"""`python -m client`, the same as the `peertrain` command."""

from client.cli import main

main()
