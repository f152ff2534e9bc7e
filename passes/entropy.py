"""entropy: the last pass of a pipeline — mark the model for packed (.onnxc) output.

The graph is not edited (the pass is exact); the model is marked with the coder, so
`onnxcomp.save(model, "x.onnxc")` (or `optimize ... -o x.onnxc`) writes the packed file with
it. With `estimate` (the default) the model is packed once here: the stats give the packed
size and the per-tensor coder choices, and the packed bytes are kept for save() to reuse
while the model is unchanged.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from onnxcomp.base import Pass, PassResult, param
from onnxcomp.io.coding import CODERS
from onnxcomp.registry import register


@register
class Entropy(Pass):
    """Entropy-code the weights: mark the model for packed .onnxc output (lossless, exact)."""

    name = "entropy"
    lossless = True
    exact = True

    @dataclass(frozen=True)
    class Config:
        coder: str = param("auto", "coder for the weights (auto picks the smallest per tensor and plane)",
                           choices=CODERS)
        estimate: bool = param(True, "pack once now to report the packed size (and reuse it when saving)")

    def run(self, model, ctx) -> PassResult:
        from onnxcomp.io.container import pack_proto

        coder = self.config.coder
        previous = (model.packing or {}).get("coder")
        packing = {"coder": coder}
        stats: dict = {"coder": coder}
        if self.config.estimate:
            proto = model.to_proto()
            serialized = proto.SerializeToString(deterministic=True)
            data, pack_stats = pack_proto(proto, coder)
            packing["_cache"] = ((coder, zlib.crc32(serialized), len(serialized)), data)
            stats.update({
                "plain_bytes": len(serialized),
                "packed_bytes": pack_stats["packed_bytes"],
                "ratio": len(serialized) / max(1, pack_stats["packed_bytes"]),
                "tensors": pack_stats["tensors"],
                "choices": pack_stats["choices"],
            })
        model.packing = packing
        return PassResult(changed=previous != coder, stats=stats)
