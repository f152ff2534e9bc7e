"""Distillation: size against accuracy with and without retraining (Deep Compression's lever).

Digits CNN (test accuracy on the held-out split; fp32 file size as the base of the ratios), for
several sparsity / codebook-bits settings:
  post-training  fold, cleanup, fuse, prune(s, global, hessian), codebook(b), entropy
  distilled      ... prune(...), distill, codebook(b), distill, entropy   (teacher: the fp32 model)
(8 bits: int8 QDQ, quantize(per_channel=true), in place of the codebook: the fake-quantized path.)
The distill passes train on the training split's images without labels (the teacher labels
them); one row adds the labels (hard-label term). Sizes are packed .onnxc bytes.

MiniLM: sentence-embedding cosine vs fp32 after 70 % magnitude pruning, before and after a
short distillation (hidden-state MSE) on the zoo's calibration sentences plus those of the
MiniLM package's model card; evaluated on the zoo's held-out sentences (disjoint).

`--quick`: one digits setting and a few MiniLM steps.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import onnxcomp
from benchmarks.common import md_table, write_results
from onnxcomp.model import save

SETTINGS = [(0.8, 4), (0.9, 3), (0.9, 2), (0.92, 2), (0.95, 2), (0.9, 8)]  # 8 bits: int8 QDQ, not a codebook
EPOCHS = 30
TARGET_RATIO, MAX_DROP = 40.0, 0.5


def packed_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnxc"
        save(model, path)
        return path.stat().st_size


def digits_rows(quick: bool) -> tuple[list[dict], dict]:
    from models import zoo
    from models.digits import split

    entry = zoo.get("digits_cnn")
    fp32_bytes = entry.path.stat().st_size
    base = entry.evaluate(entry.path)["test_acc"]
    train = entry.calibration(10**6)  # every training image, no labels
    labelled = [{**f, "labels": y[None]} for f, y in zip(train, split()[1])]
    rows = []
    plan = [(0.92, 2)] if quick else SETTINGS
    for sparsity, bits in plan:
        prune = f"fold, cleanup, fuse, prune(sparsity={sparsity}, scope=global, saliency=hessian)"
        share = "quantize(per_channel=true)" if bits == 8 else f"codebook(bits={bits})"
        variants = [("post-training", f"{prune}, {share}, entropy", train),
                    ("distilled", f"{prune}, distill(epochs={EPOCHS}), {share}, distill(epochs={EPOCHS}), entropy",
                     train)]
        if (sparsity, bits) == (0.92, 2):
            variants.append(("distilled + labels", variants[1][1], labelled))
        for kind, spec, data in variants:
            t0 = time.perf_counter()
            result = onnxcomp.optimize(entry.path, spec, calibration=data, check=False, gate=False)
            seconds = time.perf_counter() - t0
            size = packed_bytes(result.model)
            acc = entry.evaluate(result.model.to_proto())["test_acc"]
            rows.append({"sparsity": sparsity, "bits": bits, "kind": kind, "pipeline": spec, "packed_bytes": size,
                         "ratio": fp32_bytes / size, "test_acc": acc, "drop_points": 100 * (base - acc),
                         "seconds": round(seconds, 1),
                         "meets_target": fp32_bytes / size >= TARGET_RATIO and 100 * (base - acc) <= MAX_DROP})
            print(f"digits {kind:20s} s={sparsity} b={bits}: {size:,} B ({fp32_bytes / size:.1f}x) acc {acc:.4f}",
                  flush=True)
    return rows, {"fp32_bytes": fp32_bytes, "fp32_test_acc": base, "train_samples": len(train)}


def model_card_sentences() -> list[str]:
    """Sentences of the MiniLM package's model card (README.md): text at hand that does not change."""
    from models import minilm

    text = (minilm.model_dir() / "README.md").read_text()
    parts = re.split(r"(?<=[.!?])\s+|\n", text)
    return [p.strip() for p in parts if 6 <= len(p.split()) <= 30 and not p.strip().startswith(("|", "`", "#", "-", "<"))]


def minilm_row(quick: bool) -> dict:
    from models import minilm, zoo
    from onnxcomp.distill import DistillConfig, distill

    entry = zoo.get("minilm")
    ok, reason = entry.available()
    if not ok:
        return {"skipped": reason}
    pruned = onnxcomp.optimize(entry.path, "fold, cleanup, prune(sparsity=0.7)", check=False, gate=False).model
    before = entry.evaluate(pruned.to_proto())
    length = 32  # padded (attention 0) so that sentences batch together
    sentences = minilm.SENTENCES[0::2] + model_card_sentences()
    feeds = [f for f in (minilm.encode(s, pad_to=length) for s in sentences) if f["input_ids"].shape[1] == length]
    steps = 10 if quick else 150
    cfg = DistillConfig(steps=steps, lr=2e-4, batch_size=8)
    result = distill(pruned, entry.path, feeds, cfg)
    after = entry.evaluate(pruned.to_proto())
    print(f"minilm 70 % pruned: cos_mean {before['cos_mean']:.4f} -> {after['cos_mean']:.4f} "
          f"({steps} steps, {result.seconds:.0f}s)", flush=True)
    return {"pipeline": "fold, cleanup, prune(sparsity=0.7)", "train_sentences": len(feeds), "steps": steps,
            "batch_size": cfg.batch_size, "lr": cfg.lr, "seconds": round(result.seconds, 1),
            "loss_first": result.loss_first, "loss_last": result.loss_last,
            "cos_mean_before": before["cos_mean"], "cos_min_before": before["cos_min"],
            "cos_mean_after": after["cos_mean"], "cos_min_after": after["cos_min"]}


def main(quick: bool = False, argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    rows, facts = digits_rows(quick)
    mini = minilm_row(quick)
    seconds = time.perf_counter() - t0
    best = [r for r in rows if r["meets_target"]]
    lines = [
        "# Distillation: size vs accuracy, with and without retraining\n",
        (f"Digits CNN: fp32 {facts['fp32_bytes']:,} bytes, test accuracy {facts['fp32_test_acc']:.4f}; "
         f"distill trains on the {facts['train_samples']} training images (no labels unless stated), "
         f"{EPOCHS} epochs after pruning and {EPOCHS} after clustering. Target: >= {TARGET_RATIO:g}x smaller "
         f"with <= {MAX_DROP} points of accuracy lost.\n"),
        md_table(["sparsity", "bits", "kind", "packed bytes", "x smaller", "test acc", "drop (points)", "target met"],
                 [[r["sparsity"], "8 (int8)" if r["bits"] == 8 else r["bits"], r["kind"], r["packed_bytes"],
                   round(r["ratio"], 1), round(r["test_acc"], 4), round(r["drop_points"], 2),
                   "yes" if r["meets_target"] else "no"] for r in rows]),
        "",
    ]
    if best:
        top = max(best, key=lambda r: r["ratio"])
        lines.append(f"Best meeting the target ({top['kind']}): `{top['pipeline']}` — {top['packed_bytes']:,} bytes "
                     f"({top['ratio']:.1f}x), test accuracy {top['test_acc']:.4f}.\n")
    if "skipped" in mini:
        lines.append(f"MiniLM: skipped ({mini['skipped']}).")
    else:
        lines += [(f"MiniLM, 70 % magnitude pruning, then {mini['steps']} distillation steps (batch "
                   f"{mini['batch_size']}, {mini['train_sentences']} sentences, {mini['seconds']:.0f}s on CPU):\n"),
                  md_table(["", "embedding cosine mean", "min"],
                           [["pruned", round(mini["cos_mean_before"], 4), round(mini["cos_min_before"], 4)],
                            ["pruned + distilled", round(mini["cos_mean_after"], 4), round(mini["cos_min_after"], 4)]])]
    lines.append(f"\nTotal run time {seconds:.0f}s.")
    write_results("distill", {"quick": quick, "digits": {**facts, "rows": rows}, "minilm": mini,
                              "seconds": round(seconds, 1)}, "\n".join(lines))
    return 0
