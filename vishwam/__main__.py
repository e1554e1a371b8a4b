"""`python -m vishwam COMMAND [ARGS...]`: the command lines of `vishwam.commands`."""

import importlib
import sys

from vishwam.commands import COMMANDS


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = ", ".join(name.replace("_", "-") for name in COMMANDS)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m vishwam COMMAND [ARGS...]\ncommands: {names}\n"
              "`python -m vishwam COMMAND --help` describes one.")
        return 0 if argv else 2
    name = argv[0].replace("-", "_")
    if name not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; choose one of: {names}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"vishwam.commands.{name}")
    sys.argv[0] = f"vishwam {argv[0]}"
    own = {"own_process": True} if name in ("train", "distill") else {}
    return module.main(argv[1:], **own)


if __name__ == "__main__":
    sys.exit(main())
