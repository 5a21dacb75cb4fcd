"""`python -m tierflow ...` is the same as the `tierflow` command (how `tierflow up` starts its children)."""

from tierflow.cli.main import main

main()
