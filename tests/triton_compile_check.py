"""Compiles every Triton kernel of the package for a Hopper GPU (sm_90) without a GPU.

The interpreter runs the kernels' arithmetic but not Triton's compiler: type errors, dot-shape
limits and loop-carried type changes only show when a kernel is lowered to PTX and assembled
(ptxas ships with triton). Run in a process without TRITON_INTERPRET. Prints one line per
compiled kernel variant and exits non-zero on the first failure.
"""
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile  # noqa: E402

from qadapter_kernels.ops import TRITON_KERNELS  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)


def check(kernel, types: dict, constexprs: dict) -> None:
    """types: argument -> Triton type string ("*bf16", "i32", "fp32", ...); constexprs: the rest."""
    missing = set(kernel.arg_names) - set(types) - set(constexprs)
    assert not missing, f"{kernel.__name__}: no type for {sorted(missing)}"
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    compiled = compile(ASTSource(kernel, signature, constexprs), target=HOPPER)
    assert compiled.asm.get("cubin"), f"{kernel.__name__}: ptxas produced no cubin"
    print(f"ok  {kernel.__name__:34s} {constexprs} shared={compiled.metadata.shared} B "
          f"cubin={len(compiled.asm['cubin'])} B")


def main() -> None:
    assert TRITON_KERNELS, "qadapter_kernels.ops registered no Triton kernel"
    for name, (kernel, variants) in TRITON_KERNELS.items():
        assert variants, f"{name}: registered without a variant to compile"
        for variant in variants:
            check(kernel, variant.types, variant.constexprs)


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # report which kernel failed, then fail the process
        print(f"FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise
