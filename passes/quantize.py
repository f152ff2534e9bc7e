"""quantize: static int8 QDQ insertion with calibration, accuracy-aware fallback and a latency gate.

    X -> Conv(W, b) -> Relu -> Y
      => Q(X) -> DQ -> Conv(DQ(W int8), DQ(b int32)) -> Q(Y) -> DQ -> Y'     (ORT: QLinearConv)

Placement (onnxcomp.quant.placement) puts Q/DQ only where ONNX Runtime's CPU EP fuses them into
integer kernels; activation ranges come from streaming calibrators (minmax, percentile, entropy,
mse) run over the context's calibration data. Per-channel weights need opset 13: older models
are upgraded with onnx.version_converter first (noted in the report). With `max_error`, the
most sensitive nodes stay in float until the error on held-out data holds. Afterwards the
quantized model is timed against the float one; a slowdown is reported loudly (and is an error
with require_speedup=true). Gather embedding tables become int8 rows with a scale per row
(onnxcomp.quant.embedding): QDQ placement never reaches them, and they are often the largest tensor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from onnxcomp.base import Pass, PassResult, param
from onnxcomp.errors import PassError
from onnxcomp.model import Model, upgrade_opset
from onnxcomp.quant import calibrators, fallback, latency
from onnxcomp.quant.embedding import quantize_embeddings
from onnxcomp.quant.insert import QuantOptions, apply_plan
from onnxcomp.quant.placement import DEFAULT_OPS, fold_batchnorm, make_plan, name_nodes
from onnxcomp.quant.scoped import candidate_tensors, quantize_graphs
from onnxcomp.registry import register
from onnxcomp.subgraphs import node_scopes, scopes

QDQ_OPSET = 13  # per-channel DequantizeLinear (axis) and int32 bias per channel


@register
class Quantize(Pass):
    """Static int8 quantization: calibrated QDQ placed where ORT fuses integer kernels."""

    name = "quantize"
    lossless = False

    @dataclass(frozen=True)
    class Config:
        calibrator: str = param("minmax", "how activation ranges are chosen",
                                choices=tuple(calibrators.CALIBRATORS))
        percentile: float = param(99.99, "tail kept by the percentile calibrator", min=50.0, max=100.0)
        per_channel: bool = param(False, "one weight scale per output channel (needs opset 13; upgrades)")
        per_tensor_below: float = param(0.0, "with per_channel: a weight whose rounding with one scale alone moves "
                                        "the float model's outputs by less than this (relative squared error, "
                                        "measured) keeps one scale: a smaller packed file", min=0.0)
        activation_type: str = param("uint8", "activation integer type", choices=("uint8", "int8"))
        symmetric: bool = param(False, "symmetric activations (zero point at mid-range)")
        reduce_range: bool = param(False, "7-bit weights (avoids u8s8 saturation on AVX2 without VNNI)")
        ops: tuple[str, ...] = param((), "op types to quantize (default: every op ORT's CPU EP fuses)")
        exclude: tuple[str, ...] = param((), "node names or op types (fnmatch) kept in float")
        samples: int = param(0, "calibration samples to use (0: all)", min=0)
        max_error: float | None = param(None, "accuracy-aware fallback: tolerated error (see metric)", min=0.0)
        metric: str = param("cosine", "fallback error: 1-cosine, 1-top1 agreement, or mse",
                            choices=("cosine", "top1", "mse"))
        latency_check: bool = param(True, "time the quantized model against the float one on the target EP")
        require_speedup: bool = param(False, "fail when the quantized model is slower than the float one")
        embeddings: bool = param(True, "int8 tables with a scale per row for Gather embeddings (weight-only)")

    def backoff(self, shortfall: float = 1.0):
        """For the accuracy gate: keep more nodes in float (a tighter fallback tolerance each time)."""
        current = self.config.max_error
        if current is not None and current <= 1e-4:
            return None
        return self.with_params(max_error=0.01 if current is None else current / 4)

    def run(self, model: Model, ctx) -> PassResult:
        cfg = self.config
        started = time.perf_counter()
        data = ctx.require_calibration(self.name)
        feeds = list(data)[: cfg.samples or None]
        stats: dict = {}
        work = model
        if model.opset < QDQ_OPSET:
            work = upgrade_opset(model, QDQ_OPSET)
            ctx.note(f"quantize: upgraded the model from opset {model.opset} to {QDQ_OPSET} "
                     f"(QDQ{' per channel' if cfg.per_channel else ''} needs it)")
            stats["opset_upgraded_from"] = model.opset
        float_model = work.copy()
        name_nodes(float_model.graph)
        folded = fold_batchnorm(float_model)
        if folded:
            stats["batchnorm_folded"] = folded
        ops = cfg.ops or DEFAULT_OPS
        provider = (ctx.providers or ["cpu"])[0]

        # calibration: every float tensor around a candidate op, streamed
        candidates = candidate_tensors(float_model.graph, ops)
        t0 = time.perf_counter()
        ranges = calibrators.calibrate(float_model, candidates, feeds, cfg.calibrator, provider=provider,
                                       percentile=cfg.percentile)
        stats["calibration_s"] = round(time.perf_counter() - t0, 3)
        stats["calibration_samples"] = len(feeds)
        keep_one_scale: set[str] = set()
        if cfg.per_channel and cfg.per_tensor_below:
            from onnxcomp.quant.channel_choice import per_tensor_enough

            keep_one_scale, _ = per_tensor_enough(float_model, feeds, cfg.per_tensor_below, "int8", cfg.reduce_range)
        opts = QuantOptions(cfg.activation_type, cfg.symmetric, "int8", cfg.reduce_range, frozenset(keep_one_scale))

        embedding_stats: dict = {}

        scoped: dict = {}

        def build(extra_exclude: list[str]) -> tuple[Model, object, object]:
            m = float_model.copy()
            exclude = tuple(cfg.exclude) + tuple(extra_exclude)
            done = quantize_graphs(m.graph, ranges, opts, ops=ops, exclude=exclude, per_channel=cfg.per_channel,
                                   symmetric=cfg.symmetric)
            scoped["last"] = done
            if cfg.embeddings:
                embedding_stats.update(quantize_embeddings(m.graph, exclude))
            return m, done.plan, done.inserted

        quantized, plan, inserted = build([])
        if scoped["last"].not_calibrated:
            stats["subgraphs_not_calibrated"] = scoped["last"].not_calibrated
            ctx.note(f"quantize: {len(scoped['last'].not_calibrated)} subgraph(s) kept in float: no calibration "
                     f"sample ran them, or they sit in an If inside a loop body "
                     f"({', '.join(scoped['last'].not_calibrated[:4])})")
        if embedding_stats.get("embeddings_quantized"):
            stats.update(embedding_stats)
        if not plan.anchors() and not embedding_stats.get("embeddings_quantized"):
            stats["skipped"] = dict(list(plan.skipped.items())[:20])
            ctx.note("quantize: no Conv/MatMul/Gemm could be quantized; the model is unchanged")
            return PassResult(False, stats)

        if cfg.max_error is not None:
            quantized, plan, inserted = self._fallback(float_model, (quantized, plan, inserted), build, ranges,
                                                       opts, feeds, ctx, stats)
        _check_loads(quantized)

        stats.update({
            "calibrator": cfg.calibrator,
            "quantized_nodes": len(plan.nodes),
            "quantized_anchors": len(plan.anchors()),
            "skipped_nodes": len(plan.skipped),
            "activations_quantized": len(inserted.activations),
            "weights_quantized": inserted.weights,
            "biases_quantized": inserted.biases,
            "relu_absorbed": inserted.absorbed,
            "qdq_nodes_added": inserted.nodes_added,
            "per_channel": bool(inserted.per_channel),
            "per_tensor_kept": int(inserted.per_tensor_kept),
            "quantize_s": round(time.perf_counter() - started, 3),
        })
        last = scoped["last"]
        if last.per_subgraph or last.not_calibrated:
            stats["subgraph_weights_quantized"] = sum(v["weights_quantized"] for v in last.per_subgraph.values())
            stats["per_subgraph"] = last.per_subgraph
            stats["subgraphs_not_calibrated"] = last.not_calibrated
        if cfg.latency_check or cfg.require_speedup:
            self._latency_gate(float_model, quantized, feeds[0], provider, ctx, stats)

        model.graph = quantized.graph
        model.opset_imports = dict(quantized.opset_imports)
        model.ir_version = quantized.ir_version
        return PassResult(True, stats)

    # ---- accuracy-aware fallback --------------------------------------------------------------
    def _fallback(self, float_model, built, build, ranges, opts, feeds, ctx, stats):
        cfg = self.config
        quantized, plan, _ = built
        eval_feeds = list(ctx.evaluation)[:16] if ctx.evaluation is not None else feeds[:16]
        stats["fallback_data"] = "evaluation" if ctx.evaluation is not None else "calibration (no evaluation data given)"
        reference = fallback.outputs(float_model, eval_feeds)
        full = fallback.output_error(reference, fallback.outputs(quantized, eval_feeds), cfg.metric)
        stats["error_all_quantized"] = full
        if full <= cfg.max_error:
            stats["error"] = full
            stats["kept_float"] = []
            return built

        def quantize_one(graph, rng):
            p = make_plan(graph, set(rng), ops=(graph.nodes[0].op,), per_channel=cfg.per_channel,
                          symmetric_activations=cfg.symmetric)
            apply_plan(graph, p, rng, opts)

        wanted = {a.name for a in plan.anchors()}
        in_loop = {id(n) for sc in scopes(float_model.graph) if sc.in_loop for n in sc.graph.nodes}
        anchors = [n for _, n in node_scopes(float_model.graph) if n.name in wanted]
        sens, local = fallback.sensitivity(float_model, [n for n in anchors if id(n) not in in_loop],
                                           eval_feeds[:4], quantize_one, ranges, cfg.metric)
        unmeasured = [n.name for n in anchors if id(n) in in_loop]
        if unmeasured:  # noise cannot be injected per iteration: counted as sensitive as the worst measured
            worst = max(sens.values(), default=0.0)
            sens.update({k: worst for k in unmeasured})
            ctx.note(f"quantize: fallback could not measure {len(unmeasured)} node(s) inside Loop/Scan bodies "
                     "alone; they rank as the most sensitive measured one")
        order = sorted(sens, key=lambda k: -sens[k])

        def error_of(kept: list[str]) -> float:
            m, _, _ = build(kept)
            return fallback.output_error(reference, fallback.outputs(m, eval_feeds), cfg.metric)

        kept, err, trials = fallback.search(order, error_of, cfg.max_error, full)
        stats["error"] = err
        stats["fallback_trials"] = [list(t) for t in trials]
        stats["kept_float"] = [{"node": k, "op": next(n.op for n in anchors if n.name == k),
                                "error_if_only_this_quantized": round(sens[k], 8),
                                "local_relative_error": round(local[k], 8) if k in local else None} for k in kept]
        why = ", ".join(f"{k} (alone: {cfg.metric} error {sens[k]:.2e})" for k in kept[:8]) + (
            " ..." if len(kept) > 8 else "")
        ctx.note(f"quantize: error {full:.4g} > max_error {cfg.max_error:g} ({cfg.metric}); kept {len(kept)} most "
                 f"sensitive node(s) in float -> error {err:.4g}: {why}")
        if err > cfg.max_error:
            ctx.note(f"quantize: WARNING even with every quantized node in float the error is {err:.4g}")
        m, p, ins = build(kept)
        return m, p, ins

    # ---- latency gate ----------------------------------------------------------------------
    def _latency_gate(self, float_model, quantized, feed, provider, ctx, stats):
        try:
            timing = latency.gate(float_model, quantized, feed, provider)
        except Exception as exc:  # timing must not sink a correct result
            ctx.note(f"quantize: latency check skipped ({type(exc).__name__}: {exc})")
            return
        stats.update({k: round(v, 4) for k, v in timing.items()})
        if timing["speedup"] < 1.0:
            msg = (f"quantize: WARNING the int8 model is SLOWER than float on {provider}: "
                   f"{timing['quantized_ms']:.3g} ms vs {timing['float_ms']:.3g} ms "
                   f"(x{1 / timing['speedup']:.2f}); this CPU may lack fast int8 (VNNI)")
            ctx.note(msg)
            stats["slower_than_float"] = True
            if self.config.require_speedup:
                raise PassError(msg.replace("quantize: WARNING ", "quantize: require_speedup: "))


def _check_loads(model: Model) -> None:
    import onnx

    from onnxcomp.runtime import CannotRun, make_session

    proto = model.to_proto()
    try:
        onnx.checker.check_model(proto)
        make_session(proto, "cpu")
    except (onnx.checker.ValidationError, CannotRun) as exc:
        raise PassError(f"quantize produced a model ONNX Runtime cannot load ({exc}); please report it") from exc
