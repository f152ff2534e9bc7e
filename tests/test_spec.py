"""The pipeline spec grammar, its file forms, and parse-time parameter validation."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from onnxcomp import Pass, PassResult, Pipeline, SpecError, param, register


@register
class SpecProbe(Pass):
    """A pass with one parameter of every kind, for grammar tests."""

    name = "spec_probe"

    @dataclass(frozen=True)
    class Config:
        sparsity: float = param(0.5, "a fraction", min=0.0, max=1.0)
        pattern: str = param("none", "a choice", choices=("none", "2:4", "4:8"))
        steps: int = param(3, "an integer", min=1)
        enabled: bool = param(True, "a flag")
        include: tuple[str, ...] = param((), "name patterns")

    def run(self, model, ctx):
        return PassResult(False)


def test_canonical_text_round_trips_to_an_equal_pipeline():
    pipeline = Pipeline.parse("spec_probe, spec_probe(sparsity=0.25, pattern=2:4, steps=7, enabled=false, "
                              "include=[conv*, 'a b', \"c,d\"])")
    text = str(pipeline)
    assert text == 'spec_probe, spec_probe(sparsity=0.25, pattern=2:4, steps=7, enabled=false, include=[conv*, "a b", "c,d"])'
    assert Pipeline.parse(text) == pipeline


def test_default_parameters_are_left_out_of_the_canonical_text():
    assert str(Pipeline.parse("spec_probe(sparsity=0.5, steps=3)")) == "spec_probe"


def test_yaml_and_json_files_parse_to_the_same_pipeline_as_text(tmp_path):
    text = Pipeline.parse("spec_probe, spec_probe(sparsity=0.7, include=[fc1])")
    yaml_file = tmp_path / "p.yaml"
    yaml_file.write_text("passes:\n  - spec_probe\n  - spec_probe: {sparsity: 0.7, include: [fc1]}\n")
    json_file = tmp_path / "p.json"
    json_file.write_text(json.dumps({"passes": ["spec_probe", {"name": "spec_probe", "sparsity": 0.7,
                                                                "include": ["fc1"]}]}))
    assert Pipeline.parse(str(yaml_file)) == text
    assert Pipeline.parse(str(json_file)) == text


def test_pipeline_file_options_reach_the_pipeline(tmp_path):
    path = tmp_path / "p.yml"
    path.write_text("verify_each: true\non_failure: continue\npasses: spec_probe\n")
    pipeline = Pipeline.parse(str(path))
    assert pipeline.verify_each and pipeline.on_failure == "continue"


@pytest.mark.parametrize("spec, message", [
    ("spec_probe(sparsity=1.5)", "sparsity = 1.5 is out of range"),
    ("spec_probe(pattern=3:4)", "pattern = '3:4' is not allowed"),
    ("spec_probe(steps=2.5)", "is not an integer"),
    ("spec_probe(enabled=maybe)", "is not a boolean"),
    ("spec_probe(bogus=1)", "unknown parameter 'bogus'"),
    ("spec_prob", "did you mean 'spec_probe'"),
    ("spec_probe(", "ended early"),
    ("spec_probe,,", "expected a pass name"),
    ("spec_probe(sparsity=0.1, sparsity=0.2)", "given twice"),
    ("", "empty"),
    ("spec_probe; rm -rf /", "unexpected"),
])
def test_bad_specs_fail_at_parse_time_with_one_line(spec, message):
    with pytest.raises(SpecError) as info:
        Pipeline.parse(spec)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_comments_and_newlines_are_allowed_in_spec_text():
    assert Pipeline.parse("spec_probe  # first\n, spec_probe(steps=2)\n") == Pipeline.parse("spec_probe, spec_probe(steps=2)")
