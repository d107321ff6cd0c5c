"""Episodes, single- and multi-turn, as token sequences; and the environment calls behind them.

An episode starts from `env.reset(row)` -> (prompt, state). The prompt is either
raw text, encoded as it is (today's single-turn tasks), a list of chat
messages, rendered with the tokenizer's chat template and its generation prompt,
or `{"messages": [...], "tools": [...]}`: chat messages offered tools (tools or
their function schemas, `rlhub.envs.tools.offer`: through the template's own
`tools` where it renders them, else as a system message in the call format of
the model's family).
Each assistant turn is generated from the whole context so far; `env.step(state,
message)` answers a `StepResult`. Until `done`, its `observation` (a user message
as a string, or a list of messages with roles user, tool or system) is appended
as tokens, and the next turn is generated after it.

The context is kept as tokens, never re-tokenized: the assistant's tokens are the
ones it sampled (with their log-probs and policy versions) and carry the loss; the
prompt and every observation carry none (`loss_mask` 0, version -1, log-prob 0).
Observation tokens are the chat template's rendering of the new messages after
the assistant's turn, found by rendering the conversation with a marker in place
of that turn and taking what follows the marker (without the end-of-turn text
when the model already sampled it).

`EnvRunner` runs the environment's methods off the engine's thread: a plain
method in a thread pool, an `async def` one on an event loop of its own, each
with a deadline (`env.timeout_s`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

Message = Mapping[str, Any]
ROLES = ("system", "user", "assistant", "tool")
_MARK = "\u0000rlhub-turn\u0000"


class EnvTimeout(TimeoutError):
    """An environment call ran past env.timeout_s."""


class BadReward(TypeError):
    """An environment returned a reward that is not a real number, or not a StepResult."""


def check_messages(messages: Any, what: str) -> list[dict[str, Any]]:
    """A list of {"role", "content"} dicts with known roles, or an error naming what is wrong."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TypeError(f"{what}: expected a non-empty list of chat messages, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise TypeError(f"{what}[{i}]: a chat message is a mapping with 'role' and 'content', got {m!r:.200}")
        if m["role"] not in ROLES:
            raise ValueError(f"{what}[{i}]: role {m['role']!r} is not one of {ROLES}")
        out.append(dict(m))
    return out


class ChatFormat:
    """Prompts and observations as token ids, for one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        from rlhub.envs.tools import format_for

        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        self.end_of_turn = tokenizer.decode([eos]) if eos is not None else ""
        self.tool_format = format_for(tokenizer)
        """The tool-call format of this model's family: what tool instructions ask for, and what
        `ModelMessage.tool_format` tells the environment."""

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt(self, prompt: Any) -> tuple[list[int], list[dict[str, Any]] | None]:
        """(token ids, chat history or None for a raw-text prompt)."""
        if isinstance(prompt, str):
            return self.encode(prompt), None
        tools: Any = None
        if isinstance(prompt, Mapping):
            unknown = set(prompt) - {"messages", "tools"}
            if "messages" not in prompt or unknown:
                raise TypeError(f"reset() prompt: a mapping prompt is {{'messages': [...], 'tools': [...]}}, got keys {sorted(prompt)}")
            prompt, tools = prompt["messages"], prompt.get("tools") or None
        messages = check_messages(prompt, "reset() prompt")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the environment gives chat messages, but the model's tokenizer has no chat template")
        if tools:
            from rlhub.envs.tools import offer

            messages, tools = offer(messages, tools, self.tokenizer, self.tool_format)
        text = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        return self.encode(text), messages

    def observation(self, history: list[dict[str, Any]] | None, observation: Any, finished: bool) -> tuple[list[int], list[dict[str, Any]]]:
        """(token ids that follow the assistant's last turn, the new messages). `history` ends with
        that assistant turn (None: a raw-text episode, whose observation is text appended as it is);
        `finished`: the turn ended with the end-of-turn token, which is then not repeated."""
        if history is None:
            if not isinstance(observation, str):
                raise TypeError(f"a raw-text episode's observation must be a string, got {type(observation).__name__}")
            return self.encode(observation), [{"role": "user", "content": observation}]
        new = [{"role": "user", "content": observation}] if isinstance(observation, str) else check_messages(observation, "observation")
        marked = [*history[:-1], {"role": "assistant", "content": _MARK}, *new]
        text = self.tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
        after = text[text.rindex(_MARK) + len(_MARK):]
        if finished and self.end_of_turn and after.startswith(self.end_of_turn):
            after = after[len(self.end_of_turn):]
        return self.encode(after), new


@dataclass
class Episode:
    """One sample's episode: its context after the prompt, with who produced each token."""

    group_id: int
    row_index: int
    state: Any
    prompt_ids: list[int]
    history: list[dict[str, Any]] | None
    """The chat so far (None: raw text)."""
    ids: list[int] = field(default_factory=list)
    """Every token after the prompt: assistant turns and observations."""
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    routes: Any = None
    """[n, layers, top_k] the experts each position so far was routed to (None where the engine
    records no routing): by the forward that sampled the token after it, or that first computed it
    (prompt and observation tokens). A later turn's record never replaces an earlier one's."""
    turns: int = 0
    generated: int = 0
    finish_reason: str = "stop"
    """How the last assistant turn ended."""
    result: Any = None
    """The last StepResult."""
    ended: str | None = None
    """done (the environment said so), max_turns or max_tokens (cut), or the reason it was dropped."""
    dropped: bool = False
    in_env: bool = False
    """Its last turn is with the environment."""
    in_engine: bool = False
    """Its next turn is being generated in a continuous engine's running batch."""
    row: Any = None
    """The dataset row it started from (for failure reports)."""
    turn_rewards: list[tuple[int, float]] = field(default_factory=list)
    """(index in `ids` of a turn's last generated token, the reward its step returned), turn by turn."""
    turn_end: int = -1
    """Index in `ids` of the last turn's last generated token."""
    partial: int = 0
    """Tokens at the end of `ids` that open the next turn without finishing it (a branch that continues
    a turn from inside it, `rlhub.rollout.branches`): the next completion finishes that turn."""
    last_turn: list[int] = field(default_factory=list)
    """The last assistant turn's tokens, a branch's inherited opening included: what the environment reads."""
    cut_values: list[tuple[int, float]] | None = None
    """SPO: (index in `ids` of the token a cut comes before, the cut's Monte Carlo value), once its branches ended."""
    agent: str = ""
    """Its agent, in a multi-agent environment: this episode holds that agent's context and tokens alone."""
    match: Any = None
    """The multi-agent episode it is one agent's part of (`rlhub.rollout.matches.Match`), or None."""
    parked: bool = False
    """Not this agent's turn: it waits for the others (a multi-agent episode)."""
    snapshots: list["Snapshot"] | None = None
    """Where the episode can be branched from (kept only when the advantage estimator branches): the
    state before each turn, with what the episode held then. None: not kept."""

    @property
    def total_reward(self) -> float:
        """The episode's return: the sum of its turns' rewards."""
        return sum(r for _, r in self.turn_rewards)

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.ids

    def add_turn(self, completion: Any) -> None:
        n = len(completion.token_ids)
        start = len(self.ids) - self.partial
        self.ids += completion.token_ids
        self.last_turn, self.partial = self.ids[start:], 0
        self.loss_mask += [1] * n
        self.logprobs += completion.logprobs
        self.versions += completion.versions
        self.routes = merged_routes(self.routes, completion.routed_experts)
        self.turn_end = len(self.ids) - 1
        self.turns += 1
        self.generated += n
        self.finish_reason = completion.finish_reason

    def add_observation(self, ids: list[int]) -> None:
        self.ids += ids
        self.loss_mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.versions += [-1] * len(ids)


@dataclass
class Snapshot:
    """An episode before one of its turns: a branch from inside that turn starts from here."""

    at: int
    """len(ids) when the turn began."""
    state: Any
    """A copy of the environment's state, taken before the turn's step changed it."""
    history: list[dict[str, Any]] | None
    turn_rewards: list[tuple[int, float]]
    turns: int


def merged_routes(earlier: Any, turn: Any) -> Any:
    """An episode's routing record after a turn: the positions earlier turns recorded keep their
    routes; the turn's record (its prompt was the whole context, so it covers every position so far)
    adds the positions first computed in this turn. An engine that replayed `earlier` returns it
    unchanged; one that routed those positions again under newer weights is not believed over them.

    >>> import torch
    >>> merged_routes(torch.tensor([[[1]], [[2]]]), torch.tensor([[[7]], [[7]], [[3]]])).flatten().tolist()
    [1, 2, 3]
    """
    if earlier is None or turn is None:
        return turn
    import torch

    return torch.cat([earlier, turn[earlier.shape[0]:]]) if turn.shape[0] > earlier.shape[0] else earlier


def checked_reward(result: Any) -> float:
    """The StepResult's reward as a finite float; BadReward otherwise (a NaN counts as non-finite)."""
    reward = getattr(result, "reward", None)
    if reward is None or isinstance(reward, (str, bytes)) or not hasattr(result, "done"):
        raise BadReward(f"step() must return a StepResult with a numeric reward, got {result!r:.200}")
    try:
        value = float(reward)
    except (TypeError, ValueError):
        raise BadReward(f"step() returned reward {reward!r:.100}, not a number") from None
    return value if math.isfinite(value) else math.nan


class EnvHung(RuntimeError):
    """Every thread of an environment pool is held by a call that ran past its deadline: the process
    must end to get them back (a rollout actor that raises this is replaced, and counted)."""


class EnvRunner:
    """Environment calls off the caller's thread, each with a deadline.

    A call that runs past its deadline is abandoned: its result is never read. An
    `async def` call is cancelled; a plain one cannot be stopped from outside and
    keeps its pool thread. Once `workers` threads of a pool are held so, the next
    `submit` raises `EnvHung`: threads cannot be killed, so the process that holds
    them has to end (the rollout actor is replaced; its groups start again).
    """

    def __init__(self, timeout_s: float, workers: int = 4) -> None:
        self.timeout_s = timeout_s
        self.workers = workers
        # resets have a pool of their own: new episodes start while slow steps fill the other
        self._pools = {lane: self._new_pool(lane) for lane in ("reset", "step")}
        self._stuck: dict[str, list[Call]] = {lane: [] for lane in self._pools}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rlhub-env-async", daemon=True)
        self._thread.start()

    def _new_pool(self, lane: str) -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix=f"rlhub-env-{lane}")

    def submit(self, fn: Callable[..., Any], *args: Any, lane: str = "step") -> "Call":
        stuck = self.stuck(lane)
        if stuck >= self.workers:
            raise EnvHung(f"{stuck} {lane} calls of the environment still run past env.timeout_s={self.timeout_s:g} s, "
                          f"holding all {self.workers} threads of their pool")
        now = time.monotonic()
        call = Call(None, now, self.timeout_s, lane)  # type: ignore[arg-type]
        if inspect.iscoroutinefunction(fn):  # an event loop runs them all at once: each starts now
            call.started = now
            call.future = asyncio.run_coroutine_threadsafe(fn(*args), self._loop)
        else:
            call.future = self._pools[lane].submit(self._call, call, fn, args)
        return call

    def _call(self, call: "Call", fn: Callable[..., Any], args: tuple) -> Any:
        call.started = time.monotonic()  # the deadline counts from here, not from the time spent queued
        out = fn(*args)
        if inspect.isawaitable(out):  # a plain method that returned a coroutine
            out = asyncio.run_coroutine_threadsafe(_awaited(out), self._loop).result()
        return out

    def result(self, call: "Call") -> Any:
        """The call's value or its exception; EnvTimeout once its deadline has passed."""
        while True:
            remaining = call.deadline - time.monotonic()
            try:  # while queued the deadline may still move (to start + timeout): look again shortly
                return call.future.result(timeout=max(0.0, remaining if call.started is not None else min(remaining, 0.05)))
            except concurrent.futures.TimeoutError:
                if call.deadline - time.monotonic() > 0:
                    continue
            if not call.future.cancel():
                self._stuck[call.lane].append(call)  # a plain call already running: its thread stays busy
            raise EnvTimeout(f"no answer within env.timeout_s={self.timeout_s:g} s") from None

    def stuck(self, lane: str) -> int:
        """Threads of `lane`'s pool still held by calls that ran past their deadline."""
        self._stuck[lane] = [c for c in self._stuck[lane] if not c.future.done()]
        return len(self._stuck[lane])

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self._loop.call_soon_threadsafe(self._loop.stop)


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


QUEUED_FOR = 10
"""A plain call may wait in its pool's queue this many times env.timeout_s before it counts as timed out."""


@dataclass
class Call:
    """One environment call: `timeout_s` from when it starts running (queued calls wait their turn)."""

    future: concurrent.futures.Future
    submitted: float
    timeout_s: float
    lane: str = "step"
    started: float | None = None

    @property
    def deadline(self) -> float:
        return self.started + self.timeout_s if self.started is not None else self.submitted + QUEUED_FOR * self.timeout_s

    def done(self) -> bool:
        return self.future.done() or time.monotonic() >= self.deadline


def run_all(runner: EnvRunner, calls: Sequence[Call]) -> list[tuple[Any, BaseException | None]]:
    """(value, None) or (None, exception) for each call, waiting for each up to its deadline."""
    out: list[tuple[Any, BaseException | None]] = []
    for call in calls:
        try:
            out.append((runner.result(call), None))
        except Exception as e:  # noqa: BLE001 - whatever the environment raised is reported, not raised
            out.append((None, e))
    return out
