"""`python scripts/train.py` = `vishwam-train` = `python -m vishwam train` (`vishwam/commands/train.py`)."""

from vishwam.commands.train import *  # noqa: F403  (the command's public names, for programs that import this file)
from vishwam.commands.train import entry

if __name__ == "__main__":
    entry()
