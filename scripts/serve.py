"""`python scripts/serve.py` = `vishwam-serve` = `python -m vishwam serve` (`vishwam/commands/serve.py`)."""

from vishwam.commands.serve import *
from vishwam.commands.serve import entry

if __name__ == "__main__":
    entry()
