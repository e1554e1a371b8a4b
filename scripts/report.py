"""`python scripts/report.py` = `vishwam-report` = `python -m vishwam report` (`vishwam/commands/report.py`)."""

from vishwam.commands.report import *  # noqa: F403  (the command's public names, for programs that import this file)
from vishwam.commands.report import entry

if __name__ == "__main__":
    entry()
