"""`python scripts/upcycle.py` = `vishwam-upcycle` = `python -m vishwam upcycle` (`vishwam/commands/upcycle.py`)."""

from vishwam.commands.upcycle import *  # noqa: F403  (the command's public names, for programs that import this file)
from vishwam.commands.upcycle import entry

if __name__ == "__main__":
    entry()
