"""Run-time shape and dtype checks of vishwam's annotated functions and modules, by a switch.

`enable_runtime_checks()` (or `VISHWAM_RUNTIME_CHECKS=1` in the environment, or `--typecheck`
on any script) installs jaxtyping's import hook with beartype for the `vishwam` package: every
function and `eqx.Module` annotated with `Float[Array, "batch seq hidden"]`-style hints then
checks its arguments and results when called, and a wrong shape or dtype fails with one error
naming the argument, the expected and the actual shape. The hook acts on modules imported after
it, so switch it on before using anything from vishwam (`import vishwam` alone is fine: it loads
its modules on first use). Checking costs time at trace time only, not inside compiled code.
"""

import os
import sys

ENV_VAR = "VISHWAM_RUNTIME_CHECKS"
_PACKAGE = __name__.rpartition(".")[0]
# Modules that may be loaded before the switch without escaping it.
_ALLOWED_BEFORE = {_PACKAGE, __name__, f"{_PACKAGE}.cli", f"{_PACKAGE}.files"}
_state = {"hook": None}


def runtime_checks_enabled() -> bool:
    """Whether `enable_runtime_checks` has run in this process."""
    return _state["hook"] is not None


def enable_runtime_checks() -> None:
    """Check shapes and dtypes of vishwam's annotated code at run time (jaxtyping + beartype).

    Raises:
        RuntimeError: vishwam modules were already imported, so they would escape the
            checks; call this first, or set `VISHWAM_RUNTIME_CHECKS=1` before Python starts.
    """
    if runtime_checks_enabled():
        return
    loaded = sorted(name for name in sys.modules if name.startswith(f"{_PACKAGE}.") and name not in _ALLOWED_BEFORE)
    if loaded:
        raise RuntimeError(
            f"enable_runtime_checks: {len(loaded)} vishwam module(s) are imported already ({', '.join(loaded[:3])}"
            f"{', ...' if len(loaded) > 3 else ''}) and would not be checked; call it right after `import vishwam`, "
            f"before using anything from it, or set {ENV_VAR}=1 in the environment.")
    from jaxtyping import install_import_hook

    _state["hook"] = install_import_hook(_PACKAGE, "beartype.beartype")


def enable_from_environment() -> None:
    """`enable_runtime_checks()` when `VISHWAM_RUNTIME_CHECKS` is set to 1 (or true/yes)."""
    if os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on"):
        enable_runtime_checks()
