"""Hugging Face front-end: a `transformers` model (an object, or a local folder with its config and
weights) to ONNX with Optimum's input and output names, verified against the torch model on ORT.

Encoders (BERT/MiniLM style): `feature-extraction` gives `last_hidden_state`,
`sequence-classification` gives `logits`. Decoders (GPT-2/Llama style): `causal-lm` gives `logits`;
with `past=True` the model also takes `past_key_values.N.key/value` ([batch, heads,
past_sequence_length, head size]) and returns `present.N.key/value`, and one model serves every
step: the first with a past of length 0, then each next token with the presents fed back. The
inputs are `input_ids`, `attention_mask` (over past and new tokens) and, where the model takes
them, `token_type_ids`, with dynamic `batch_size`, `sequence_length` and `past_sequence_length`.

`optimum`/`optimum-onnx` would be the ecosystem's exporter, but it needs transformers < 4.58
and this project runs transformers 5, so export goes through onnxcomp.torch_export (torch.onnx,
verified on ORT at two batch sizes) with the same names Optimum's exports use. The model runs in
eager attention: the SDPA path exports with shape guards that fix the sequence length.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from onnxcomp.errors import InputError

TASKS = ("auto", "feature-extraction", "sequence-classification", "causal-lm")
OUTPUT_NAME = {"feature-extraction": "last_hidden_state", "sequence-classification": "logits", "causal-lm": "logits"}
AXES = {0: "batch_size", 1: "sequence_length"}


def _load(source: Any, task: str):
    """(model, task): a transformers model object as it is, or one loaded from a local folder."""
    try:
        import transformers
    except ImportError as exc:
        raise InputError("exporting a Hugging Face model needs transformers: pip install 'onnxcomp[hf]'") from exc
    if not isinstance(source, (str, Path)):
        model = source
    else:
        folder = Path(source)
        if not (folder / "config.json").is_file():
            raise InputError(f"{folder}: not a Hugging Face model folder (no config.json); give a local folder, "
                             "nothing is downloaded")
        config = transformers.AutoConfig.from_pretrained(folder)
        if task == "auto":
            task = "causal-lm" if getattr(config, "is_decoder", False) or any(
                a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures or []) \
                else "sequence-classification" if any(a.endswith("ForSequenceClassification")
                                                      for a in config.architectures or []) else "feature-extraction"
        loader = {"feature-extraction": transformers.AutoModel,
                  "sequence-classification": transformers.AutoModelForSequenceClassification,
                  "causal-lm": transformers.AutoModelForCausalLM}[task]
        model = loader.from_pretrained(folder, attn_implementation="eager")
    if task == "auto":
        name = type(model).__name__
        task = "causal-lm" if name.endswith(("ForCausalLM", "LMHeadModel")) else \
            "sequence-classification" if name.endswith("ForSequenceClassification") else "feature-extraction"
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    elif hasattr(model, "config"):
        model.config._attn_implementation = "eager"
    return model.eval(), task


def export_hf(source: Any, path: str | Path | None = None, *, task: str = "auto", past: bool = False,
              batch: int = 2, sequence: int = 8, opset: int = 17, atol: float = 1e-4):
    """Export a transformers model; returns torch_export's ExportResult (model, exporter, error)."""
    import torch

    from onnxcomp.torch_export import export

    if task not in TASKS:
        raise InputError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    model, task = _load(source, task)
    if past:
        if task != "causal-lm":
            raise InputError(f"past key/values are for causal-lm decoders, not {task}")
        return _export_with_past(model, path, batch, sequence, opset, atol)
    config = model.config
    names = ["input_ids", "attention_mask"]
    takes_types = bool(getattr(config, "type_vocab_size", 0)) and \
        "token_type_ids" in inspect.signature(model.forward).parameters
    if takes_types:
        names.append("token_type_ids")
    output = OUTPUT_NAME[task]

    class Wrapped(torch.nn.Module):
        """Positional inputs in Optimum's order; one named output; no cache."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            kwargs = dict(zip(names, inputs))
            if task == "causal-lm":
                kwargs["use_cache"] = False
            return getattr(self.inner(**kwargs), output)

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(config.vocab_size, 1000), (batch, sequence), generator=generator)
    mask = torch.ones(batch, sequence, dtype=torch.int64)
    mask[0, sequence // 2:] = 0 if task != "causal-lm" else 1  # padding in one row (encoders)
    args = [ids, mask] + ([torch.zeros(batch, sequence, dtype=torch.int64)] if takes_types else [])
    axes = {name: dict(AXES) for name in names} | {output: {0: "batch_size"} if task == "sequence-classification"
                                                  else dict(AXES)}
    with torch.no_grad():
        return export(Wrapped(model), tuple(args), path, dynamic_axes=axes, input_names=names,
                      output_names=[output], opset=opset, exporter="torchscript", atol=atol)


def _export_with_past(model, path, batch: int, sequence: int, opset: int, atol: float):
    """The decoder with its KV cache as tensors in and out (Optimum's names). The cache is rebuilt
    from the tensors inside the traced forward; positions come from the attention mask, so every
    past length (0 included) runs the same graph. Checked on ORT at several batch, past and new
    lengths beside torch_export's own check."""
    import torch
    from transformers import DynamicCache

    from onnxcomp.torch_export import check_export, export

    config = model.config
    with torch.no_grad():  # the cache layout (layers, heads, head size) as this model makes it
        probe = model(input_ids=torch.zeros(1, 2, dtype=torch.int64), use_cache=True).past_key_values
    layers = len(probe.layers)
    heads, head_size = probe.layers[0].keys.shape[1], probe.layers[0].keys.shape[3]
    past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    names = ["input_ids", "attention_mask"] + past_names
    outputs = ["logits"] + present_names

    class WithPast(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, *cache_in):
            cache = DynamicCache(ddp_cache_data=[(cache_in[2 * i], cache_in[2 * i + 1]) for i in range(layers)],
                                 config=config)
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                             position_ids=positions, use_cache=True)
            return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])

    def example(b: int, p: int, s: int, seed: int) -> tuple:
        generator = torch.Generator().manual_seed(seed)
        cache = [torch.randn(b, heads, p, head_size, generator=generator) for _ in past_names]
        ids = torch.randint(0, min(config.vocab_size, 1000), (b, s), generator=generator)
        return (ids, torch.ones(b, p + s, dtype=torch.int64), *cache)

    wrapped = WithPast(model).eval()
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"}}
    axes |= {n: {0: "batch_size", 2: "past_sequence_length"} for n in past_names}
    axes |= {n: {0: "batch_size", 2: "past_sequence_length + sequence_length"} for n in present_names}
    with torch.no_grad():
        result = export(wrapped, example(batch, 3, sequence, 0), None, dynamic_axes=axes, input_names=names,
                        output_names=outputs, opset=opset, exporter="torchscript", atol=atol)
        for b, p, s in ((1, 0, sequence), (batch + 1, 0, 1), (1, 2 * sequence + 1, 1)):  # first step, next steps
            error = check_export(wrapped, result.model, example(b, p, s, b * 100 + p), names, atol, rtol=0.0)
            result.max_abs_error = max(result.max_abs_error, error)
    if path is not None:
        from onnxcomp.model import save

        save(result.model, path)
    return result
