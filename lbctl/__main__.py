"""`python -m lbctl`: the same CLI as the `lbctl` console script."""
from lbctl.cli import main

main()
