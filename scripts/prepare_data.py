"""`python scripts/prepare_data.py` = `vishwam-prepare-data` = `python -m vishwam prepare-data` (`vishwam/commands/prepare_data.py`)."""

from vishwam.commands.prepare_data import *  # noqa: F403  (the command's public names, for programs that import this file)
from vishwam.commands.prepare_data import entry

if __name__ == "__main__":
    entry()
