"""Hugging Face front-end: a `transformers` model (an object, or a local folder with its config and
weights) to ONNX with Optimum's input and output names, verified against the torch model on ORT.

Encoders (BERT/MiniLM style): `feature-extraction` gives `last_hidden_state`,
`sequence-classification` gives `logits`. Decoders (GPT-2/Llama style): `causal-lm` gives `logits`
for the whole sequence, without a KV cache. The inputs are `input_ids`, `attention_mask` and, where
the model takes them, `token_type_ids`, with dynamic `batch_size` and `sequence_length` axes.

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
                a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in config.architectures or []) \
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


def export_hf(source: Any, path: str | Path | None = None, *, task: str = "auto", batch: int = 2,
              sequence: int = 8, opset: int = 17, atol: float = 1e-4):
    """Export a transformers model; returns torch_export's ExportResult (model, exporter, error)."""
    import torch

    from onnxcomp.torch_export import export

    if task not in TASKS:
        raise InputError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    model, task = _load(source, task)
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
