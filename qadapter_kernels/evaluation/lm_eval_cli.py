"""lm-eval's own command line with the ``qadapter`` model registered and the shipped tasks on its path.

    python3 -m qadapter_kernels.evaluation.lm_eval_cli run --model qadapter --model_args adapter=DIR \
        --tasks qadapter_retention,qadapter_pref_lowercase --apply_chat_template

Everything after the program name is lm-eval's (``run``, ``ls tasks``, ``validate``); this only
registers the model class (lm-eval 0.4.13 discovers no plug-ins) and adds ``--include_path`` for
the tasks shipped in ``qadapter_kernels/evaluation/tasks`` unless one is given.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

SHIPPED_TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def lm_eval_arguments(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--include_path`` pointing at the shipped tasks where the subcommand reads tasks."""
    args = list(argv)
    if args and args[0] in ("run", "ls", "validate") and "--include_path" not in args:
        args += ["--include_path", str(SHIPPED_TASKS_DIR)]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("qadapter lm-eval: error: lm-eval is not installed (pip install 'qadapter-kernels[eval]')",
              file=sys.stderr)
        raise SystemExit(2)
    from . import lm_eval_model  # noqa: F401  (registers the "qadapter" model)

    args = lm_eval_arguments(sys.argv[1:] if argv is None else argv)
    saved_argv, sys.argv = sys.argv, ["lm-eval", *args]  # lm-eval's console script reads sys.argv
    try:
        cli_evaluate()
    finally:
        sys.argv = saved_argv


if __name__ == "__main__":
    main()
