"""Render a Helm chart's templates without helm, for the subset of Go templates the chart uses.

No helm binary can be installed here from PyPI or Debian, so the deploy tests render
``deploy/helm/infergate`` with this module and validate the output like any manifest. It follows Go
``text/template`` and Helm semantics for what it supports, and raises ``TemplateError`` on anything
else, so a template that strays outside the subset fails the tests instead of rendering wrongly:

- actions ``{{ pipeline }}`` with ``{{-``/``-}}`` whitespace trimming and ``{{/* comments */}}``;
- ``if``/``else if``/``else``/``end``, ``with``/``else``/``end``, ``range`` over lists and maps
  (``range $k, $v := ...`` too), ``define``/``end``;
- pipelines of commands joined by ``|`` (the piped value becomes the last argument), parenthesised
  sub-pipelines, ``.a.b`` fields, ``$`` and ``$name`` variables, string/number/bool literals;
- the functions in ``FUNCTIONS`` below (Helm's built-ins and the Sprig functions the chart uses).

Values come from ``values.yaml`` merged with extra values files the way ``helm -f`` merges them
(maps merged key by key, anything else replaced, ``null`` deletes the key).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class TemplateError(Exception):
    """The chart uses something this renderer does not support, or fails while rendering."""


# -- parsing ------------------------------------------------------------------------------------

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)


@dataclass
class Node:
    kind: str  # text | action | if | with | range | define
    text: str = ""
    branches: list[tuple[str, list["Node"]]] = field(default_factory=list)  # (pipeline, body); "" = else
    variables: tuple[str, ...] = ()


def _lex(source: str) -> list[tuple[str, str]]:
    """('text', str) and ('action', str) tokens, with Go's whitespace trimming applied."""
    tokens: list[tuple[str, str]] = []
    position = 0
    trim_next = False
    for match in _ACTION.finditer(source):
        text = source[position : match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        tokens.append(("text", text))
        body = match.group(2).strip()
        if not (body.startswith("/*") and body.endswith("*/")):
            tokens.append(("action", body))
        trim_next = bool(match.group(3))
        position = match.end()
    tail = source[position:]
    tokens.append(("text", tail.lstrip() if trim_next else tail))
    return [t for t in tokens if t != ("text", "")]


def parse(source: str, name: str = "template") -> tuple[list[Node], dict[str, list[Node]]]:
    """The template's nodes and the ``define``d templates it contains."""
    tokens = _lex(source)
    defines: dict[str, list[Node]] = {}
    index = 0

    def block(closers: tuple[str, ...]) -> tuple[list[Node], str]:
        nonlocal index
        nodes: list[Node] = []
        while index < len(tokens):
            kind, value = tokens[index]
            index += 1
            if kind == "text":
                nodes.append(Node("text", value))
                continue
            keyword = value.split(None, 1)[0] if value else ""
            if keyword in closers or (keyword == "else" and "else" in closers):
                return nodes, value
            if keyword in ("if", "with", "range"):
                nodes.append(control(keyword, value[len(keyword) :].strip()))
            elif keyword == "define":
                template_name = _string_literal(value[len("define") :].strip(), name)
                body, _ = block(("end",))
                defines[template_name] = body
            elif keyword in ("end", "else", "template", "block", "break", "continue"):
                raise TemplateError(f"{name}: unexpected or unsupported {{{{ {value} }}}}")
            else:
                nodes.append(Node("action", value))
        if closers:
            raise TemplateError(f"{name}: missing {{{{ end }}}}")
        return nodes, ""

    def control(keyword: str, pipeline: str) -> Node:
        node = Node(keyword)
        if keyword == "range":
            match = re.match(r"^(\$\w+)\s*(?:,\s*(\$\w+))?\s*:=\s*(.+)$", pipeline, re.DOTALL)
            if match:
                node.variables = tuple(v for v in match.group(1, 2) if v)
                pipeline = match.group(3)
        while True:
            body, closer = block(("end", "else"))
            node.branches.append((pipeline, body))
            if closer == "end":
                return node
            rest = closer[len("else") :].strip()
            if rest.startswith("if ") and keyword == "if":
                pipeline = rest[3:].strip()
            elif rest:
                raise TemplateError(f"{name}: unsupported {{{{ {closer} }}}}")
            else:
                pipeline = ""
                body, closer = block(("end",))
                node.branches.append(("", body))
                return node

    nodes, _ = block(())
    return nodes, defines


def _string_literal(text: str, name: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return json.loads(text)
    raise TemplateError(f"{name}: expected a quoted name, got {text!r}")


# -- evaluation ---------------------------------------------------------------------------------

_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|`[^`]*`|\(|\)|\||[^\s()|]+)')


def _tokens(pipeline: str) -> list[str]:
    tokens, position = [], 0
    pipeline = pipeline.strip()
    while position < len(pipeline):
        match = _TOKEN.match(pipeline, position)
        if not match:
            raise TemplateError(f"cannot read pipeline {pipeline!r}")
        tokens.append(match.group(1))
        position = match.end()
        while position < len(pipeline) and pipeline[position].isspace():
            position += 1
    return tokens


def truthy(value: Any) -> bool:
    return not (value is None or value is False or value == 0 or value == "" or value == [] or value == {})


def _to_yaml(value: Any) -> str:
    if value is None:
        return "null"
    return yaml.safe_dump(value, default_flow_style=False, sort_keys=True).rstrip("\n")


def _indent(width: int, text: str) -> str:
    pad = " " * width
    return pad + str(text).replace("\n", "\n" + pad)


def _go_printf(template: str, *args: Any) -> str:
    converted = re.sub(r"%v|%d|%s", "%s", template)
    return converted % tuple(_print(a) for a in args)


def _required(message: str, value: Any) -> Any:
    if value is None or value == "":
        raise TemplateError(message)
    return value


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = _merge(base.get(key), value)
        return merged
    return copy.deepcopy(override)


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "quote": lambda *values: " ".join(json.dumps(_print(v)) for v in values),
    "toYaml": _to_yaml,
    "toJson": lambda value: json.dumps(value, separators=(",", ":"), sort_keys=True),
    "nindent": lambda width, text: "\n" + _indent(width, text),
    "indent": _indent,
    "default": lambda fallback, value=None: value if truthy(value) else fallback,
    "trunc": lambda length, text: str(text)[:length],
    "trimSuffix": lambda suffix, text: str(text).removesuffix(suffix),
    "printf": _go_printf,
    "sha256sum": lambda text: hashlib.sha256(str(text).encode()).hexdigest(),
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "not": lambda value: not truthy(value),
    "and": lambda *values: next((v for v in values if not truthy(v)), values[-1]),
    "or": lambda *values: next((v for v in values if truthy(v)), values[-1]),
    "required": _required,
    "toString": lambda value: _print(value),
    "int": lambda value: int(value),
    "add": lambda *values: sum(int(v) for v in values),
}


def _print(value: Any) -> str:
    if value is None:
        return ""  # Helm turns Go's "<no value>" into ""
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        raise TemplateError(f"cannot print a {type(value).__name__} directly; use toYaml")
    return str(value)


class Renderer:
    def __init__(self, chart_dir: Path, values_files: tuple[Path, ...] = (), release: str = "infergate", namespace: str = "default") -> None:
        self.chart_dir = Path(chart_dir)
        chart = yaml.safe_load((self.chart_dir / "Chart.yaml").read_text(encoding="utf-8"))
        values = yaml.safe_load((self.chart_dir / "values.yaml").read_text(encoding="utf-8")) or {}
        for path in values_files:
            values = _merge(values, yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {})
        self.root = {
            "Values": values,
            "Release": {"Name": release, "Namespace": namespace, "Service": "Helm", "IsInstall": True},
            "Chart": {key[0].upper() + key[1:]: value for key, value in chart.items()},
        }
        self.templates: dict[str, list[Node]] = {}
        self.defines: dict[str, list[Node]] = {}
        for path in sorted((self.chart_dir / "templates").iterdir()):
            if path.suffix not in (".yaml", ".yml", ".tpl"):
                continue  # NOTES.txt is printed by helm, not applied
            nodes, defines = parse(path.read_text(encoding="utf-8"), path.name)
            self.defines.update(defines)
            if not path.name.startswith("_"):
                self.templates[path.name] = nodes

    def render(self) -> dict[str, str]:
        """Rendered text per template file."""
        return {name: self._run(nodes, self.root, {"$": self.root}) for name, nodes in self.templates.items()}

    def manifests(self) -> list[dict]:
        """Every Kubernetes object the chart renders (empty documents dropped)."""
        objects = []
        for name, text in self.render().items():
            try:
                documents = list(yaml.safe_load_all(text))
            except yaml.YAMLError as exc:
                raise TemplateError(f"{name} does not render to YAML: {exc}\n{text}") from exc
            objects.extend(doc for doc in documents if doc)
        return objects

    # -- the interpreter ------------------------------------------------------------------------

    def _run(self, nodes: list[Node], dot: Any, variables: dict[str, Any]) -> str:
        out = []
        for node in nodes:
            if node.kind == "text":
                out.append(node.text)
            elif node.kind == "action":
                value = self._pipeline(node.text, dot, variables)
                if not (node.text.startswith("$") and ":=" in node.text):
                    out.append(_print(value))
            elif node.kind == "if":
                for pipeline, body in node.branches:
                    if pipeline == "" or truthy(self._pipeline(pipeline, dot, variables)):
                        out.append(self._run(body, dot, dict(variables)))
                        break
            elif node.kind == "with":
                (pipeline, body), *rest = node.branches
                value = self._pipeline(pipeline, dot, variables)
                if truthy(value):
                    out.append(self._run(body, value, dict(variables)))
                elif rest:
                    out.append(self._run(rest[0][1], dot, dict(variables)))
            elif node.kind == "range":
                (pipeline, body), *rest = node.branches
                value = self._pipeline(pipeline, dot, variables)
                items = sorted(value.items()) if isinstance(value, dict) else list(enumerate(value or []))
                if not items and rest:
                    out.append(self._run(rest[0][1], dot, dict(variables)))
                for key, item in items:
                    scope = dict(variables)
                    if len(node.variables) == 2:
                        scope[node.variables[0]], scope[node.variables[1]] = key, item
                    elif node.variables:
                        scope[node.variables[0]] = item
                    out.append(self._run(body, item, scope))
        return "".join(out)

    def _pipeline(self, pipeline: str, dot: Any, variables: dict[str, Any]) -> Any:
        tokens = _tokens(pipeline)
        if len(tokens) > 2 and tokens[0].startswith("$") and tokens[1] == ":=":
            variables[tokens[0]] = self._commands(tokens[2:], dot, variables)
            return None
        return self._commands(tokens, dot, variables)

    def _commands(self, tokens: list[str], dot: Any, variables: dict[str, Any]) -> Any:
        commands: list[list[Any]] = [[]]
        depth = 0
        group: list[str] = []
        for token in tokens:  # split on top-level "|", keep parenthesised groups whole
            if depth:
                if token == "(":
                    depth += 1
                elif token == ")":
                    depth -= 1
                    if depth == 0:
                        commands[-1].append(("group", group))
                        group = []
                        continue
                group.append(token)
            elif token == "(":
                depth = 1
            elif token == "|":
                commands.append([])
            else:
                commands[-1].append(token)
        if depth:
            raise TemplateError(f"unbalanced parentheses in {' '.join(tokens)!r}")
        value: Any = _NOTHING
        for command in commands:
            value = self._command(command, dot, variables, value)
        return value

    def _command(self, command: list[Any], dot: Any, variables: dict[str, Any], piped: Any) -> Any:
        if not command:
            raise TemplateError("empty command in a pipeline")
        head, *args = command
        if isinstance(head, str) and (head in FUNCTIONS or head == "include"):
            values = [self._argument(a, dot, variables) for a in args]
            if piped is not _NOTHING:
                values.append(piped)
            if head == "include":
                name, context = values
                if name not in self.defines:
                    raise TemplateError(f"include of an undefined template {name!r}")
                return self._run(self.defines[name], context, {"$": self.root})
            try:
                return FUNCTIONS[head](*values)
            except TemplateError:
                raise
            except Exception as exc:
                raise TemplateError(f"{head} {values!r}: {exc}") from exc
        if args or piped is not _NOTHING:
            raise TemplateError(f"{head!r} is not a function this renderer knows")
        return self._argument(head, dot, variables)

    def _argument(self, token: Any, dot: Any, variables: dict[str, Any]) -> Any:
        if isinstance(token, tuple):  # a parenthesised sub-pipeline
            return self._commands(token[1], dot, variables)
        if token.startswith('"'):
            return json.loads(token)
        if token.startswith("`"):
            return token[1:-1]
        if token in ("true", "false"):
            return token == "true"
        if token == "nil":
            return None
        if re.fullmatch(r"-?\d+", token):
            return int(token)
        if token == ".":
            return dot
        if token.startswith("."):
            return _field(dot, token[1:].split("."))
        if token.startswith("$"):
            name, _, path = token.partition(".")
            if name not in variables:
                raise TemplateError(f"undefined variable {name}")
            return _field(variables[name], path.split(".")) if path else variables[name]
        raise TemplateError(f"unsupported token {token!r}")


_NOTHING = object()


def _field(value: Any, path: list[str]) -> Any:
    for part in path:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise TemplateError(f"cannot read .{part} of a {type(value).__name__}")
        value = value.get(part)
    return value
