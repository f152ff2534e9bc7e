"""Presets: named pipeline specs, nothing more (`--preset NAME`, `onnxcomp passes --presets`)."""

from __future__ import annotations

from onnxcomp.errors import SpecError

PRESETS: dict[str, tuple[str, str]] = {
    "lossless": ("fold, cleanup, fuse", "constant folding, clean-up and fusions; outputs unchanged"),
    "int8": ("fold, cleanup, fuse, quantize(per_channel=true, per_tensor_below=0.0001)",
             "static int8 QDQ, calibrated, per-channel weight scales where one scale would move the outputs "
             "(needs --calibration; half is held out for the gate)"),
    "dynamic": ("fold, cleanup, fuse, quantize_dynamic",
                "int8 weights, activations quantized at run time for MatMul/Gemm (transformers); Conv weights "
                "weight-only int8 (needs data for the gate: --calibration or --evaluation)"),
    "int4": ("fold, cleanup, fuse, quantize_dynamic(mode=weight_only, bits=4)",
             "4-bit weight-only MatMul/Gemm weights (ORT's MatMulNBits, blocks of 32), activations in float: "
             "for transformer decoders (needs data for the gate: --calibration or --evaluation)"),
    "fp16": ("fold, cleanup, fuse, fp16",
             "float16 weights and compute, float32 inputs/outputs, normalizations and softmax kept float32 "
             "(for the CUDA EP; needs data for the gate)"),
    "deep-compression": ("fold, cleanup, fuse, prune(sparsity=0.8, scope=global, saliency=hessian), "
                         "codebook(bits=4), minify, entropy",
                         "Hessian pruning + 4-bit k-means codebooks + entropy coding (needs --calibration; "
                         "write .onnxc)"),
    "compact": ("fold, cleanup, fuse, gptq(choices=[2,3,4,5,6,8], sparsities=[0,0.5,0.75], target_ratio=16, grid=entropy, "
                "form=fold), minify, entropy",
                "GPTQ low-bit weights on grids sized for the entropy coder, per-layer bits and sparsity chosen "
                "from measured bytes and output error to 16x smaller weights, backed off by the accuracy gate "
                "by the bits its miss needs; ORT decodes them at load and runs at float speed (needs --calibration; write .onnxc)"),
    "max": ("fold, cleanup, fuse, prune(sparsity=0.95, scope=global, saliency=hessian), codebook(bits=3), minify, entropy",
            "the most aggressive start, backed off by the accuracy gate until it holds (needs --calibration)"),
}


def preset_spec(name: str) -> str:
    if name not in PRESETS:
        raise SpecError(f"unknown preset {name!r} (presets: {', '.join(PRESETS)})")
    return PRESETS[name][0]
