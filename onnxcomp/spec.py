"""Pipeline spec text <-> list of passes, and the YAML/JSON file form.

Grammar (whitespace is free; `#` starts a comment to the end of the line):

    spec   := step ("," step)*
    step   := NAME [ "(" [ arg ("," arg)* ] ")" ]
    arg    := NAME "=" value
    value  := NUMBER | "true" | "false" | WORD | QUOTED | "[" [ value ("," value)* ] "]"

WORD is any run of letters, digits and `_ . : / * - + ?` (so `pattern=2:4` and
`include=conv*` need no quotes). The grammar is small enough that a hand-written tokenizer is
shorter and gives better error positions than a parser library.

File form (YAML or JSON), either a list of steps or a mapping with `passes:`::

    passes:
      - fold
      - prune: {sparsity: 0.5}
      - {name: quantize, per_channel: true}
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

from onnxcomp.errors import SpecError

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<quoted>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<punct>[(),=\[\]])
      | (?P<word>[A-Za-z0-9_.:/*+?\-]+)
    )""",
    re.VERBOSE,
)
_BARE = re.compile(r"^[A-Za-z0-9_.:/*+?\-]+$")


def _strip_comments(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens, pos, text = [], 0, _strip_comments(text)
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if not match:
            raise SpecError(f"pipeline spec: unexpected {text[pos:].strip()[:12]!r} at character {pos + 1}")
        kind = match.lastgroup
        tokens.append((kind, match.group(kind), match.start(kind)))
        pos = match.end()
    return tokens


class _Parser:
    def __init__(self, text: str):
        self.tokens = _tokenize(text)
        self.i = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, what: str, literal: str | None = None) -> tuple[str, str, int]:
        """The next token; with `literal`, it must be exactly that punctuation."""
        tok = self.peek()
        if tok is None:
            raise SpecError(f"pipeline spec: ended early (expected {what})")
        if literal is not None and tok[1] != literal:
            raise SpecError(f"pipeline spec: expected {what} at character {tok[2] + 1}, found {tok[1]!r}")
        self.i += 1
        return tok

    def steps(self) -> list[tuple[str, dict[str, Any]]]:
        steps = []
        if self.peek() is None:
            raise SpecError("pipeline spec is empty")
        while True:
            kind, name, at = self.take("a pass name")
            if kind != "word" or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise SpecError(f"pipeline spec: expected a pass name at character {at + 1}, found {name!r}")
            params: dict[str, Any] = {}
            if self.peek() and self.peek()[1] == "(":
                self.take("'('", "(")
                while self.peek() and self.peek()[1] != ")":
                    key = self.take("a parameter name")
                    if key[0] != "word":
                        raise SpecError(f"pipeline spec: expected a parameter name at character {key[2] + 1}")
                    self.take("'='", "=")
                    if key[1] in params:
                        raise SpecError(f"{name}: parameter {key[1]} given twice")
                    params[key[1]] = self.value()
                    if self.peek() and self.peek()[1] == ",":
                        self.take("','", ",")
                self.take("')'", ")")
            steps.append((name, params))
            if self.peek() is None:
                return steps
            self.take("','", ",")

    def value(self) -> Any:
        kind, text, at = self.take("a value")
        if kind == "quoted":
            return ast.literal_eval(text)
        if text == "[":
            items = []
            while self.peek() and self.peek()[1] != "]":
                items.append(self.value())
                if self.peek() and self.peek()[1] == ",":
                    self.take("','", ",")
            self.take("']'", "]")
            return items
        if kind != "word":
            raise SpecError(f"pipeline spec: expected a value at character {at + 1}, found {text!r}")
        return _scalar(text)


def _scalar(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_steps(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Spec text -> [(pass name, raw params)], without looking passes up."""
    return _Parser(text).steps()


def load_file_steps(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any]]:
    """A YAML/JSON pipeline file -> steps and pipeline options (e.g. verify_each)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read the pipeline file ({exc})") from exc
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml and json raise their own error types
        raise SpecError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({str(exc).splitlines()[0]})") from exc
    options: dict[str, Any] = {}
    if isinstance(data, dict):
        options = {k: v for k, v in data.items() if k != "passes"}
        data = data.get("passes")
    if isinstance(data, str):
        return parse_steps(data), options
    if not isinstance(data, list) or not data:
        raise SpecError(f"{path}: expected a list of passes (or a mapping with `passes:`)")
    steps = []
    for item in data:
        if isinstance(item, str):
            steps.extend(parse_steps(item))
        elif isinstance(item, dict) and "name" in item:
            steps.append((str(item["name"]), {k: v for k, v in item.items() if k != "name"}))
        elif isinstance(item, dict) and len(item) == 1:
            (name, params), = item.items()
            steps.append((str(name), dict(params or {})))
        else:
            raise SpecError(f"{path}: cannot read the pass entry {item!r}")
    return steps, options


def format_value(value: Any) -> str:
    """Canonical text of a parameter value; parsing it gives the value back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if value is None:
        return "none"
    text = str(value)
    if _BARE.match(text) and _scalar(text) == text:
        return text
    return json.dumps(text)
