"""Compiles every Triton kernel of the package for a Hopper GPU (sm_90) without a GPU.

The interpreter runs the kernels' arithmetic but not Triton's compiler: type errors, dot-shape
limits and loop-carried type changes only show when a kernel is lowered to PTX and assembled
(ptxas ships with triton). Run in a process without TRITON_INTERPRET. Prints one line per
compiled kernel variant and exits non-zero on the first failure.
"""
import importlib
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile  # noqa: E402

# import_module: the package exports functions under some of these module names.
fused_linear, pair_loss, residual_q_values, sampling = (
    importlib.import_module(f"qadapter_kernels.{name}")
    for name in ("fused_linear", "pair_loss", "residual_q_values", "sampling")
)

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


def pointers(names, dtype):
    return {name: f"*{dtype}" for name in names}


def main() -> None:
    scalars_i32 = lambda *names: {n: "i32" for n in names}  # noqa: E731
    scalars_f32 = lambda *names: {n: "fp32" for n in names}  # noqa: E731
    for dt in ("fp32", "bf16", "fp16", "fp64"):
        rq = residual_q_values
        check(rq._residual_q_values_fwd_kernel,
              {**pointers(["q_ptr", "l_ptr"], dt), "actions_ptr": "*i64",
               **pointers(["values_ptr", "q_taken_ptr", "lse_y_ptr"], "fp32"),
               **scalars_i32("q_stride", "l_stride", "V"), **scalars_f32("alpha_tilde", "alpha_0")},
              {"BLOCK_V": 4096})
        check(rq._residual_q_values_bwd_kernel,
              {**pointers(["grad_values_ptr", "grad_q_taken_ptr", "lse_y_ptr"], "fp32"),
               **pointers(["q_ptr", "l_ptr", "grad_q_ptr"], dt), "actions_ptr": "*i64",
               **scalars_i32("q_stride", "l_stride", "V"), **scalars_f32("alpha_tilde", "alpha_0")},
              {"BLOCK_V": 4096})
        for has_bias in (False, True):
            opts = {"HAS_BIAS": has_bias, "UPCAST": dt == "fp64",
                    "DOT_PRECISION": "ieee" if dt in ("fp32", "fp64") else "tf32",
                    "BLOCK_M": fused_linear._BLOCK_M, "BLOCK_N": fused_linear._BLOCK_N,
                    "BLOCK_K": fused_linear._BLOCK_K}
            hidden = pointers(["ha_ptr", "hb_ptr", "w_ptr", "b_ptr"], dt)
            check(fused_linear._fused_linear_fwd_kernel,
                  {**hidden, "actions_ptr": "*i64", **pointers(["values_ptr", "q_taken_ptr", "lse_y_ptr"], "fp32"),
                   **scalars_i32("N", "H", "V"), **scalars_f32("alpha_tilde", "alpha_0")}, opts)
            check(fused_linear._fused_linear_dq_kernel,
                  {**hidden, "actions_ptr": "*i64",
                   **pointers(["lse_y_ptr", "grad_values_ptr", "grad_q_taken_ptr"], "fp32"), "out_ptr": f"*{dt}",
                   **scalars_i32("row0", "chunk_rows", "H", "V"), **scalars_f32("alpha_tilde", "alpha_0")}, opts)
            check(sampling._combined_from_hidden_kernel,
                  {**hidden, "out_ptr": "*fp32", **scalars_i32("N", "H", "V"),
                   **scalars_f32("alpha_tilde", "alpha_0")}, opts)
        for has_base in (True, False):
            check(sampling._combined_sample_kernel,
                  {**pointers(["q_ptr", "l_ptr"], dt),
                   **pointers(["uniforms_ptr", "temperature_ptr", "top_p_ptr", "min_p_ptr"], "fp32"),
                   "top_k_ptr": "*i64", "tokens_ptr": "*i64", **scalars_i32("V", "q_stride", "l_stride"),
                   **scalars_f32("alpha_tilde", "alpha_0")},
                  {"HAS_BASE": has_base, "BLOCK_V": sampling._BLOCK_V, "BISECT_STEPS": sampling._BISECT_STEPS})
        check(sampling._combined_logits_kernel,
              {**pointers(["q_ptr", "l_ptr"], dt), "out_ptr": "*fp32", **scalars_i32("V", "q_stride", "l_stride"),
               **scalars_f32("alpha_tilde", "alpha_0")}, {"BLOCK_V": sampling._BLOCK_V})
    for bellman in (True, False):
        check(pair_loss._pair_rows_fwd_kernel,
              {**pointers(["values_ptr", "q_taken_ptr", "rewards_ptr", "scores_ptr", "sum_sq_ptr", "count_ptr"],
                          "fp32"), "mask_ptr": "*u8", "T": "i32", **scalars_f32("gamma", "inv_norm")},
              {"BELLMAN": bellman, "BLOCK_T": 1024})
        check(pair_loss._pair_bwd_kernel,
              {**pointers(["grad_loss_ptr", "grad_pref_ptr", "grad_reg_ptr", "grad_scores_ptr", "grad_rewards_ptr",
                           "scores_ptr", "rewards_ptr", "num_scored_ptr", "grad_values_ptr", "grad_q_taken_ptr"],
                          "fp32"), "mask_ptr": "*u8", **scalars_i32("B", "T"),
               **scalars_f32("gamma", "beta", "inv_norm")},
              {"BELLMAN": bellman, "BLOCK_T": 1024})
    check(pair_loss._pair_reduce_kernel,
          {**pointers(["scores_ptr", "sum_sq_ptr", "count_ptr", "loss_ptr", "pref_ptr", "reg_ptr", "accuracy_ptr",
                       "num_scored_ptr"], "fp32"), "B": "i32", "beta": "fp32"},
          {"BLOCK": 1024})


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # report which kernel failed, then fail the process
        print(f"FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise
