"""`python -m mlxbatch` runs the command line."""

from mlxbatch.cli import main

main()
