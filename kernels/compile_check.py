"""Compile every Triton kernel variant for NVIDIA targets, no GPU needed:

    python -m pgnm_fast.kernels.compile_check [90 80 ...]

with TRITON_INTERPRET unset (decorated functions are interpreted otherwise). It goes through
Triton's whole pipeline down to a cubin (its bundled ptxas), so it catches what the interpreter
cannot: loop-carried types, dot shapes, layouts. Prints one line per variant and stops with an
error at the first failure. Used by tests/kernels/test_compile_check.py."""
import sys

from triton import next_power_of_2 as triton_next_pow2
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler import compile as triton_compile

from pgnm_fast.kernels import mask_apply, resized_crop, sample_score

F32 = "*fp32"


def variants():
    for dt in ("fp32", "bf16", "fp16"):
        yield ("sample_score", dt), sample_score._sample_score_kernel, {
            "a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "state_ptr": "*i64", "m_ptr": F32, "logp_ptr": F32,
            "sa_ptr": F32, "sb_ptr": F32, "s_ptr": F32, "flag_ptr": "*u8", "stride_ar": "i32",
            "stride_ac": "i32", "stride_br": "i32", "stride_bc": "i32"}, \
            {"N": 4096, "ROUNDS": sample_score.ROUNDS, "BLOCK": sample_score.BLOCK}, sample_score.NUM_WARPS
        yield ("score_backward", dt), sample_score._score_backward_kernel, {
            "gs_ptr": F32, "s_ptr": F32, "logp_ptr": F32, "sa_ptr": F32, "sb_ptr": F32,
            "ga_ptr": f"*{dt}", "gb_ptr": f"*{dt}", "N": "i32", "stride_gs": "i32"}, {"BLOCK": 1024}, 4
    for dt, channels in (("bf16", 1), ("fp32", 3), ("bf16", 3), ("fp16", 2)):
        yield ("mask_apply", dt, channels), mask_apply._mask_apply_kernel, {
            "x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "m_ptr": F32, "ah_ptr": F32, "aw_ptr": F32,
            "hs_ptr": "*i32", "ws_ptr": "*i32", "B": "i32", "H": "i32", "W": "i32", "G": "i32",
            **{name: "i32" for name in ("sxb", "sxc", "sxh", "sxw", "syb", "syc", "syh", "syw")}}, \
            {"C": channels, "BH": 32, "BW": 32, "KH": 16, "KW": 16, "CP": triton_next_pow2(channels),
             "IMAGES": mask_apply.IMAGES_PER_PROGRAM}, \
            mask_apply.NUM_WARPS
    # the device loader's fill under --amp --channels-last (bf16, one grey channel): its output
    # strides along C and W are 1, which the launcher turns into constants, as here
    for dt, channels, k, unit_strides in (("fp32", 1, 3, ()), ("bf16", 3, 5, ()), ("bf16", 1, 3, ("soc", "sow"))):
        sig = {"data_ptr": "*u8", "base_ptr": "*i64", "stride_ptr": "*i64", "rows_ptr": "*i32",
               "roww_ptr": "*i32", "cols_ptr": "*i32", "colw_ptr": "*i32", "table_ptr": f"*{dt}",
               "out_ptr": f"*{dt}", "S": "i32", "sob": "i32", "soc": "i32", "soh": "i32", "sow": "i32"}
        yield ("resized_crop", dt, channels, k, *unit_strides), resized_crop._resized_crop_kernel, \
            {k_: v for k_, v in sig.items() if k_ not in unit_strides}, \
            {"K": k, "C": channels, "BH": resized_crop.BLOCK, "BW": resized_crop.BLOCK,
             **{name: 1 for name in unit_strides}}, \
            resized_crop.NUM_WARPS


def main(archs):
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for name, fn, sig, constexprs, warps in variants():
            signature = dict(sig, **{k: "constexpr" for k in constexprs})
            kernel = triton_compile(ASTSource(fn, signature, constexprs=constexprs), target=target,
                                    options={"num_warps": warps})
            assert kernel.asm["cubin"], name
            print(f"sm_{arch} {name}: ok")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [90, 80])
