"""`python scripts/plan.py` = `vishwam-plan` = `python -m vishwam plan` (`vishwam/commands/plan.py`)."""

from vishwam.commands.plan import *  # noqa: F403  (the command's public names, for programs that import this file)
from vishwam.commands.plan import entry

if __name__ == "__main__":
    entry()
