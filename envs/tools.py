"""Tool calling: tools declared once, offered through the chat template, called in the model's own format.

**Declaring tools.** A tool is a typed Python function, plain or `async def`; its signature and its
docstring give the JSON schema the model sees (`Tool.from_function`, or the `tool` decorator):

    def add(a: int, b: int) -> int:
        '''Add two integers.

        Args:
            a: the first addend
            b: the second addend
        '''
        return a + b

becomes `{"name": "add", "description": "Add two integers.", "parameters": {"type": "object",
"properties": {"a": {"type": "integer", "description": "the first addend"}, ...}, "required": ["a", "b"]}}`.
Annotations map to JSON types: str, int, float, bool, list[X], dict, Literal[...] (an enum), an Enum
class, and `X | None` (optional when it has a default). A parameter without an annotation, or with
one of no JSON type, is refused when the tool is declared, naming the parameter. A tool can also be
given as a schema with a function beside it (`Tool(name, description, parameters, fn)`).

**Offering them.** `offer` renders a conversation with its tools: through the chat template's own
`tools` variable where the template uses it (Qwen 2.5/3, Llama 3.1, Mistral templates do), else as
a system message rlhub writes, which lists each schema and says how to call in the chosen format
(rlhub's tiny model and SmolLM2 have ChatML templates without tools).

**Formats** (`FORMATS`; `format_for` picks one from the chat template):

- `hermes` (Qwen, Hermes, ChatML models; the default): any number of
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, text around them is content;
- `llama3_json` (Llama 3.1/3.2): the message is a JSON object `{"name": ..., "parameters": {...}}`,
  optionally after `<|python_tag|>`, several separated by `;`;
- `mistral`: `[TOOL_CALLS]` followed by a JSON list of `{"name": ..., "arguments": {...}}`.

`parse` returns the message's content, its well-formed calls, and an error for each malformed one
(bad JSON, no name, arguments that are not an object); a message with no call in it is a final
answer. **Running them** (`run_calls`): every call of a turn at once, async tools on the event loop
and plain ones in threads, each under the deadline the environment gives; an unknown tool, arguments
that do not fit the schema, an exception or a timeout become that call's result, `error: ...`, so the
model reads what went wrong and the episode goes on. Results return as tool messages
(`{"role": "tool", "name", "tool_call_id", "content"}`), in the order of the calls.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import json
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

FORMATS = ("hermes", "llama3_json", "mistral")


# ---- declaring tools ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tool:
    """A tool the model may call: its name, what it does, its arguments' JSON schema, and the function."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    """A JSON schema of type object: properties, required."""
    fn: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}", self.name or ""):
            raise ValueError(f"tool name {self.name!r}: use letters, digits, _ . - (at most 64, not starting with a digit)")
        if self.parameters.get("type") != "object" or not isinstance(self.parameters.get("properties", {}), Mapping):
            raise ValueError(f"tool {self.name}: parameters must be a JSON schema of type object with properties")

    @classmethod
    def from_function(cls, fn: Callable[..., Any], name: str | None = None) -> "Tool":
        """The tool `fn` declares (module docstring); TypeError names a parameter that has no JSON type."""
        description, arg_docs = _docstring(inspect.getdoc(fn) or "")
        hints = typing.get_type_hints(fn)
        properties: dict[str, Any] = {}
        required: list[str] = []
        for pname, param in inspect.signature(fn).parameters.items():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise TypeError(f"tool {fn.__name__}: *{pname} has no JSON schema; name every argument")
            if pname not in hints:
                raise TypeError(f"tool {fn.__name__}: parameter {pname!r} has no type annotation")
            schema, _ = _schema(hints[pname], f"tool {fn.__name__}: parameter {pname!r}")
            if pname in arg_docs:
                schema["description"] = arg_docs[pname]
            properties[pname] = schema
            if param.default is param.empty:  # `X | None` without a default must still be given (as null)
                required.append(pname)

        return cls(name or fn.__name__, description, {"type": "object", "properties": properties, "required": required}, fn)

    def schema(self) -> dict[str, Any]:
        """The OpenAI-style function schema chat templates take (`{"type": "function", "function": {...}}`)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": json.loads(json.dumps(self.parameters))}}

    def check(self, arguments: Mapping[str, Any]) -> None:
        """ValueError naming the first argument that does not fit the schema (missing, unknown, wrong type)."""
        props = self.parameters.get("properties", {})
        missing = [p for p in self.parameters.get("required", []) if p not in arguments]
        if missing:
            raise ValueError(f"missing argument {missing[0]!r}")
        for key, value in arguments.items():
            if key not in props:
                raise ValueError(f"unknown argument {key!r}; {self.name} takes {sorted(props)}")
            if value is None and key not in self.parameters.get("required", []):
                continue  # an optional argument given as null: its default
            problem = _mismatch(props[key], value)
            if problem:
                raise ValueError(f"argument {key!r}: {problem}")


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
    """`@tool` or `@tool(name=...)`: the function as a `Tool` (still callable through `.fn`)."""
    if fn is None:
        return lambda f: Tool.from_function(f, name)
    return Tool.from_function(fn, name)


def as_tools(tools: Iterable[Tool | Callable[..., Any]]) -> list[Tool]:
    """Tools from tools or functions; ValueError for two with one name."""
    out = [t if isinstance(t, Tool) else Tool.from_function(t) for t in tools]
    names = [t.name for t in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"two tools are named {dupes[0]!r}")
    return out


_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Returns|Raises|Yields|Examples?|Notes?)\s*:?\s*$")
_ARG_LINE = re.compile(r"^\s*(\*{0,2}\w+)\s*(\([^)]*\))?\s*:\s*(.*)$")


def _docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(description: the text before the first section, {argument: its description}) of a Google-style docstring."""
    description: list[str] = []
    args: dict[str, str] = {}
    section, current = None, None
    for line in doc.splitlines():
        heading = _SECTION.match(line)
        if heading:
            section, current = heading.group(1), None
            continue
        if section is None:
            description.append(line)
        elif section in ("Args", "Arguments", "Parameters"):
            m = _ARG_LINE.match(line)
            if m and (len(line) - len(line.lstrip())) <= 8 and m.group(1).isidentifier():
                current = m.group(1)
                args[current] = m.group(3).strip()
            elif current and line.strip():
                args[current] = f"{args[current]} {line.strip()}".strip()
    return " ".join(" ".join(description).split()), args


_PRIMITIVES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _schema(annotation: Any, what: str) -> tuple[dict[str, Any], bool]:
    """(JSON schema, optional: the annotation admits None) of a type annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"{what}: a union of {len(rest)} types has no single JSON type; use one type or Literal")
        return _schema(rest[0], what)[0], len(rest) < len(args)
    if annotation in _PRIMITIVES:
        return {"type": _PRIMITIVES[annotation]}, False
    if origin is typing.Literal:
        kinds = {_PRIMITIVES.get(type(a)) for a in args}
        if None in kinds or len(kinds) != 1:
            raise TypeError(f"{what}: Literal values must all be str, int, float or all bool")
        return {"type": kinds.pop(), "enum": list(args)}, False
    if inspect.isclass(annotation) and issubclass(annotation, enum.Enum):
        return _schema(typing.Literal[tuple(m.value for m in annotation)], what)[0], False  # type: ignore[misc]
    if annotation in (list, tuple, Sequence) or origin in (list, tuple, Sequence, typing.Sequence):
        if args and not (origin is tuple and len(args) == 2 and args[1] is Ellipsis) and origin is tuple:
            raise TypeError(f"{what}: a fixed-length tuple has no JSON type; use list[X]")
        return ({"type": "array", "items": _schema(args[0], what)[0]} if args else {"type": "array"}), False
    if annotation in (dict, Mapping) or origin in (dict, Mapping, typing.Mapping):
        return {"type": "object"}, False
    if annotation is Any:
        return {}, False
    raise TypeError(f"{what}: annotation {annotation!r} has no JSON type (use str, int, float, bool, list[X], dict, Literal, Enum)")


def _mismatch(schema: Mapping[str, Any], value: Any) -> str | None:
    """Why `value` does not fit `schema` (types, enums, array items), or None."""
    kind = schema.get("type")
    ok = {"string": isinstance(value, str), "boolean": isinstance(value, bool),
          "integer": isinstance(value, int) and not isinstance(value, bool),
          "number": isinstance(value, (int, float)) and not isinstance(value, bool),
          "array": isinstance(value, list), "object": isinstance(value, dict), None: True}.get(kind, True)
    if not ok:
        return f"expected {kind}, got {type(value).__name__} {json.dumps(value)[:40]}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{json.dumps(value)[:40]} is not one of {schema['enum']}"
    if kind == "array" and "items" in schema:
        for i, item in enumerate(value):
            problem = _mismatch(schema["items"], item)
            if problem:
                return f"item {i}: {problem}"
    return None


# ---- the model's calls ----------------------------------------------------------------------------

@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = ""


@dataclass
class Parsed:
    """A model message read for tool calls."""

    content: str
    """The text outside the calls (the whole message when it has none)."""
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    """One per malformed call, in order: what the model is told instead of a result."""

    @property
    def is_final(self) -> bool:
        """No call in it, well-formed or not: the model answered."""
        return not self.calls and not self.errors


_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def parse(message: str, fmt: str = "hermes") -> Parsed:
    """The content and the calls of a model message in format `fmt` (module docstring)."""
    if fmt == "hermes":
        blocks = _HERMES.findall(message)
        content = _HERMES.sub("", message).strip()
        return _calls(blocks, "arguments", content, unclosed=message.count("<tool_call>") > message.count("</tool_call>"))
    if fmt == "llama3_json":
        text = message.strip()
        tagged = text.startswith("<|python_tag|>")
        text = text.removeprefix("<|python_tag|>").strip()
        if not tagged and not text.startswith("{"):
            return Parsed(message.strip())
        return _calls([part for part in _split_top_level(text, ";") if part.strip()], "parameters", "")
    if fmt == "mistral":
        head, marker, rest = message.partition("[TOOL_CALLS]")
        if not marker:
            return Parsed(message.strip())
        try:
            listed = json.loads(rest.strip())
        except json.JSONDecodeError as e:
            return Parsed(head.strip(), errors=[f"the calls after [TOOL_CALLS] are not a JSON list ({e.msg})"])
        if isinstance(listed, dict):
            listed = [listed]
        if not isinstance(listed, list):
            return Parsed(head.strip(), errors=["the calls after [TOOL_CALLS] must be a JSON list of objects"])
        return _calls([json.dumps(x) for x in listed], "arguments", head.strip())
    raise ValueError(f"tool format {fmt!r}: use one of {FORMATS}")


def _calls(blocks: Sequence[str], arg_key: str, content: str, unclosed: bool = False) -> Parsed:
    out = Parsed(content)
    for i, block in enumerate(blocks):
        try:
            call = json.loads(block)
        except json.JSONDecodeError as e:
            cut = " (the call was not closed)" if unclosed and i == len(blocks) - 1 else ""
            out.errors.append(f"call {i + 1} is not valid JSON: {e.msg}{cut}")
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            out.errors.append(f'call {i + 1} needs a "name" string')
            continue
        arguments = call.get(arg_key, call.get("arguments", call.get("parameters", {})))
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            out.errors.append(f'call {i + 1} ({call["name"]}): "{arg_key}" must be a JSON object')
            continue
        out.calls.append(ToolCall(call["name"], arguments, str(call.get("id") or f"call_{i + 1}")))
    return out


def _split_top_level(text: str, sep: str) -> list[str]:
    """`text` split at `sep` outside strings and brackets."""
    parts, depth, start, quoted, escaped = [], 0, 0, False, False
    for i, ch in enumerate(text):
        if quoted:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
            continue
        if ch == '"':
            quoted = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def format_call(calls: Sequence[ToolCall], fmt: str = "hermes") -> str:
    """Calls written the way format `fmt` reads them (warm starts and tests write calls with it)."""
    if fmt == "hermes":
        return "\n".join(f'<tool_call>{json.dumps({"name": c.name, "arguments": c.arguments})}</tool_call>' for c in calls)
    if fmt == "llama3_json":
        return ";".join(json.dumps({"name": c.name, "parameters": c.arguments}) for c in calls)
    if fmt == "mistral":
        return "[TOOL_CALLS]" + json.dumps([{"name": c.name, "arguments": c.arguments} for c in calls])
    raise ValueError(f"tool format {fmt!r}: use one of {FORMATS}")


# ---- offering tools through the chat template -----------------------------------------------------

def format_for(tokenizer: Any) -> str:
    """The call format a model's chat template teaches: mistral for `[TOOL_CALLS]`, llama3_json for
    `<|python_tag|>`, else hermes (also what rlhub's own tool instructions ask for)."""
    template = str(getattr(tokenizer, "chat_template", "") or "")
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template:
        return "llama3_json"
    return "hermes"


def template_takes_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders the `tools` it is given (rendered with and without them)."""
    probe = [{"role": "user", "content": "x"}]
    schema = Tool("rlhub_probe_tool", "probe", {"type": "object", "properties": {}}).schema()
    try:
        with_tools = tokenizer.apply_chat_template(probe, tools=[schema], tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that fails on tools does not take them
        return False
    return with_tools != tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)


def schemas(tools: Iterable[Tool | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The function schemas (`{"type": "function", "function": {...}}`) of tools or of schemas."""
    out = []
    for t in tools:
        schema = t.schema() if isinstance(t, Tool) else dict(t)
        if schema.get("type") != "function" and "name" in schema:  # a bare function schema
            schema = {"type": "function", "function": schema}
        if not isinstance(schema.get("function"), Mapping) or not isinstance(schema["function"].get("name"), str):
            raise ValueError(f"a tool schema needs a function with a name, got {schema!r:.200}")
        out.append(schema)
    return out


def instructions(tools: Sequence[Tool | Mapping[str, Any]], fmt: str = "hermes") -> str:
    """The system text that offers `tools` where the chat template does not: each schema, one JSON
    object per line, and how a call is written in format `fmt`."""
    listing = "\n".join(json.dumps(s["function"]) for s in schemas(tools))
    example = format_call([ToolCall("NAME", {"ARGUMENT": "VALUE"})], fmt)
    return (f"Tools you can call:\n<tools>\n{listing}\n</tools>\nTo call tools, write {example} for each call; "
            "the results come back as tool messages. Answer without a call when you are done.")


def offer(messages: Sequence[Mapping[str, Any]], tools: Sequence[Tool | Mapping[str, Any]], tokenizer: Any,
          fmt: str | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools= for `apply_chat_template`): the template's own `tools` where it renders them,
    else the tool instructions added to the system message (a new one first when there is none)."""
    messages = [dict(m) for m in messages]
    if not tools:
        return messages, None
    if template_takes_tools(tokenizer):
        return messages, schemas(tools)
    text = instructions(tools, fmt or format_for(tokenizer))
    if messages and messages[0].get("role") == "system":
        messages[0]["content"] = f"{messages[0]['content']}\n\n{text}" if messages[0]["content"] else text
    else:
        messages.insert(0, {"role": "system", "content": text})
    return messages, None


# ---- running calls --------------------------------------------------------------------------------

@dataclass
class ToolResult:
    call: ToolCall
    content: str
    ok: bool
    seconds: float = 0.0

    def message(self) -> dict[str, Any]:
        return {"role": "tool", "name": self.call.name, "tool_call_id": self.call.id, "content": self.content}


def render_result(value: Any) -> str:
    """A tool's return value as the text the model reads: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


async def run_calls(calls: Sequence[ToolCall], tools: Sequence[Tool], timeout_s: float) -> list[ToolResult]:
    """Every call at once, each under `timeout_s`; a failure is that call's `error: ...` result."""
    by_name = {t.name: t for t in tools}
    return list(await asyncio.gather(*(_run_one(call, by_name, timeout_s) for call in calls)))


async def _run_one(call: ToolCall, by_name: Mapping[str, Tool], timeout_s: float) -> ToolResult:
    loop = asyncio.get_running_loop()
    start = loop.time()
    found = by_name.get(call.name)
    if found is None or found.fn is None:
        return ToolResult(call, f"error: no tool named {call.name!r}; tools: {sorted(by_name)}", False)
    try:
        found.check(call.arguments)
    except ValueError as e:
        return ToolResult(call, f"error: {call.name}: {e}", False)
    required = found.parameters.get("required", [])
    kwargs = {k: v for k, v in call.arguments.items() if v is not None or k in required}  # null: the default
    try:
        if inspect.iscoroutinefunction(found.fn):
            value = await asyncio.wait_for(found.fn(**kwargs), timeout_s)
        else:
            value = await asyncio.wait_for(asyncio.to_thread(found.fn, **kwargs), timeout_s)
            if inspect.isawaitable(value):
                value = await asyncio.wait_for(value, max(0.0, timeout_s - (loop.time() - start)))
    except (asyncio.TimeoutError, TimeoutError):
        return ToolResult(call, f"error: {call.name} gave no result within {timeout_s:g} s", False, loop.time() - start)
    except Exception as e:  # noqa: BLE001 - the model is told what its call raised
        return ToolResult(call, f"error: {call.name} raised {type(e).__name__}: {e}", False, loop.time() - start)
    return ToolResult(call, render_result(value), True, loop.time() - start)


# ---- a tool task in a few lines -------------------------------------------------------------------

class ToolEnv:
    """A multi-turn tool task: subclass it with `tools`, `prompt(row)` and `check(row, answer)` (and
    `dataset(split)`, or rows from `env.dataset`).

    Each episode offers the tools with the prompt (`{"messages", "tools"}`: rlhub renders them into
    the chat template). Each model turn is read in the model family's call format (`tool_format`:
    `auto` takes the one rlhub passes with the message, `ModelMessage.tool_format`): a turn with calls
    gets their results as tool messages (reward 0, not done), every call of the turn run at once
    under `tool_timeout_s`; malformed calls are answered with what is wrong. A turn without a call is
    the final answer: `check(row, answer)` scores its text (outside any call), 0 when the model was
    cut off mid-turn. More than `max_tool_calls` calls in an episode, or `max_calls_per_turn` in one
    turn, end the episode with reward 0 (`info["ended"]`).

    `check` may return a bool (success, reward 1 or 0), a number (the reward) or a `StepResult`.
    """

    tools: Sequence[Tool | Callable[..., Any]] = ()
    system_prompt: str | None = None
    max_tool_calls: int = 4
    max_calls_per_turn: int = 4
    tool_timeout_s: float = 10.0
    tool_format: str = "auto"

    def dataset(self, split: str) -> Sequence[Mapping[str, Any]]:
        raise NotImplementedError(f"{type(self).__name__}: define dataset(split), or give rows with env.dataset.path")

    def prompt(self, row: Mapping[str, Any]) -> str | list[dict[str, Any]]:
        """The user's message (or the messages) that start an episode on `row`."""
        raise NotImplementedError(f"{type(self).__name__}: define prompt(row)")

    def check(self, row: Mapping[str, Any], answer: str) -> Any:
        """The final answer's score: bool, number or StepResult."""
        raise NotImplementedError(f"{type(self).__name__}: define check(row, answer)")

    def tool_list(self) -> list[Tool]:
        cached = self.__dict__.get("_rlhub_tools")
        if cached is None:
            cached = self.__dict__["_rlhub_tools"] = as_tools(self.tools)
        return cached

    def reset(self, row: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        asked = self.prompt(row)
        messages = [{"role": "user", "content": asked}] if isinstance(asked, str) else [dict(m) for m in asked]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return {"messages": messages, "tools": schemas(self.tool_list())}, {"row": row, "calls": 0}

    def call_format(self, message: str) -> str:
        return self.tool_format if self.tool_format != "auto" else getattr(message, "tool_format", "hermes")

    async def step(self, state: dict[str, Any], message: str) -> Any:
        from rlhub.envs.base import StepResult, ended_turn

        parsed = parse(str(message), self.call_format(message))
        if parsed.is_final:
            if not ended_turn(message):
                return StepResult(0.0, done=True, success=False, info={"ended": "cut_off"})
            return _scored(self.check(state["row"], parsed.content))
        asked = len(parsed.calls) + len(parsed.errors)
        if asked > self.max_calls_per_turn or state["calls"] + asked > self.max_tool_calls:
            return StepResult(0.0, done=True, success=False, info={"ended": "max_tool_calls"})
        state["calls"] += asked
        results = await run_calls(parsed.calls, self.tool_list(), self.tool_timeout_s)
        observation = [r.message() for r in results] + [{"role": "tool", "content": f"error: {e}"} for e in parsed.errors]
        failed = len(parsed.errors) + sum(not r.ok for r in results)
        return StepResult(0.0, done=False, observation=observation, info={"tool_calls": asked, "tool_errors": failed})


def _scored(value: Any) -> Any:
    from rlhub.envs.base import StepResult

    if isinstance(value, StepResult):
        return value
    if isinstance(value, bool):
        return StepResult(1.0 if value else 0.0, done=True, success=value)
    return StepResult(float(value), done=True)
