"""`python scripts/distill.py` = `vishwam-distill` = `python -m vishwam distill` (`vishwam/commands/distill.py`)."""

from vishwam.commands.distill import *  # noqa: F403  (the command's public names, for programs that import this file)
from vishwam.commands.distill import entry

if __name__ == "__main__":
    entry()
