"""The ``qadapter`` command's entry point (also ``python -m qadapter_cli``).

It arms the package's signal latch before anything heavy is imported: importing ``qadapter_kernels``
loads torch (about 2 s), and a Ctrl-C during that import would otherwise end in a traceback. This
module lives outside the package because importing anything inside it runs the package's
``__init__`` (torch) first; it uses the standard library only.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["main"]


def _signal_latch_module() -> ModuleType:
    """``qadapter_kernels.signal_latch`` (standard library only), loaded without the package's ``__init__``
    and registered under its own name, so that the package later imports this very module."""
    name = "qadapter_kernels.signal_latch"
    if name in sys.modules:
        return sys.modules[name]
    package = importlib.util.find_spec("qadapter_kernels")  # finds the package without importing it
    if package is None or not package.submodule_search_locations:
        raise SystemExit("qadapter: the qadapter_kernels package is not installed")
    path = Path(next(iter(package.submodule_search_locations))) / "signal_latch.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _command_prefix(argv: list[str]) -> str:
    # The command word is not validated yet (its list lives in the package): argparse reports a bad one.
    return "qadapter" + (f" {argv[0]}" if argv and not argv[0].startswith("-") else "")


def main() -> int:
    """Arms the latch, imports the command line, runs it with the latch (see ``qadapter_kernels.app.cli.main``)."""
    argv = sys.argv[1:]
    latch = _signal_latch_module().SignalLatch()
    latch.loading(_command_prefix(argv))  # a second Ctrl-C while torch imports ends the process at once
    with latch:
        from qadapter_kernels.app.cli import main as run

        return run(argv, latch=latch)


if __name__ == "__main__":
    sys.exit(main())
