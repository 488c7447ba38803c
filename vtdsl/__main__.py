"""`python -m vtdsl ...` is the `vtdsl` command."""

from .cli import main

main()
