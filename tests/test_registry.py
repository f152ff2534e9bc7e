"""A pass is one new file under passes/: it appears in the CLI and the spec grammar unaided."""

from __future__ import annotations

import shutil
import uuid

from onnxcomp import registry

from .helpers import REPO, run_cli

PLUGIN = '''
from dataclasses import dataclass
from onnxcomp.base import Pass, PassResult, param
from onnxcomp.registry import register


@register
class {cls}(Pass):
    """Counts Relu nodes (a pass dropped into passes/ by a test)."""

    name = "{name}"

    @dataclass(frozen=True)
    class Config:
        label: str = param("relus", "the stat's name")

    def run(self, model, ctx):
        return PassResult(False, {{self.config.label: sum(n.op == "Relu" for n in model.graph.nodes)}})
'''


def test_a_pass_in_a_new_file_under_passes_is_listed_and_runs(mnist_path, tmp_path):
    name = f"plugin_{uuid.uuid4().hex[:8]}"
    source = REPO / "passes" / f"{name}.py"
    source.write_text(PLUGIN.format(cls=name.title().replace("_", ""), name=name))
    try:
        listed = run_cli("passes")
        assert listed.returncode == 0 and name in listed.stdout, listed.stdout + listed.stderr
        out = tmp_path / "out.onnx"
        ran = run_cli("optimize", mnist_path, "-o", out, "--pipeline", f"{name}(label=relu_count)", "--json")
        assert ran.returncode == 0, ran.stderr
        assert '"relu_count": 2' in ran.stdout
    finally:
        source.unlink()
        shutil.rmtree(REPO / "passes" / "__pycache__", ignore_errors=True)


def test_every_registered_pass_has_help_and_documented_parameters():
    import dataclasses

    for name, cls in registry.all_passes().items():
        assert cls.summary(), f"{name} has no docstring"
        for field in dataclasses.fields(cls.Config):
            assert field.metadata.get("help"), f"{name}.{field.name} has no help"
