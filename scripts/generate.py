"""`python scripts/generate.py` = `vishwam-generate` = `python -m vishwam generate` (`vishwam/commands/generate.py`)."""

from vishwam.commands.generate import *  # noqa: F403  (the command's public names, for programs that import this file)
from vishwam.commands.generate import entry

if __name__ == "__main__":
    entry()
