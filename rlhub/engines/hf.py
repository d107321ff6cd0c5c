"""The built-in rollout engine: transformers forward passes with a KV cache.

Batched sampling over left-padded prompts; records the experts every position
was routed to (prompt and generated, through `rlhub.moe.Routing`), and can take new weights
between decode steps (in flight): tokens after the swap carry the new version,
while the KV cache of earlier tokens keeps the old weights' keys and values,
as in pipelined RL systems.

Each row samples its tokens with its own random numbers where the call gives it a seed
(`SamplingConfig.seeds`: a function of the seed and the decode step, `seeded_uniforms`), so what a
row samples does not depend on what the engine drew before; else from the engine's seeded generator.

Rows with the same prompt (a group's samples) are prefilled once (`shared_prompts`).
A multi-turn episode's next turn prefills its whole context again; the routes
its earlier turns recorded are replayed there (`routes`), so each position keeps
the route of the forward that first computed it, whatever the weights are now,
and the learner can replay every turn exactly at the version that sampled it.
"""

from __future__ import annotations

import time
import warnings

import torch

from rlhub.engines.base import Completion, EngineStats, SamplingConfig, WeightSource
from rlhub.models.logprobs import SamplingPolicy, positions_from_mask, probe_logprobs
from rlhub.moe import Routing, find_routers, route_dtype


def sample_categorical(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """[B] one index per row of `probs` [B, V], drawn with probability probs / its row sum: the first
    index whose cumulative sum exceeds the row's uniform draw (`uniforms` [B], in [0, 1)). One random
    number a row, where `torch.multinomial` draws an exponential for every entry (on the SmolLM2
    vocabulary, 53 ms a decode step of 32 rows, 15% of a rollout's generation)."""
    cdf = probs.cumsum(-1)
    u = uniforms.to(cdf.dtype).unsqueeze(-1) * cdf[:, -1:]
    ids = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    return ids.clamp_(max=probs.shape[-1] - 1)  # u equal to the total (rounding) falls on the last index


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply, twice) of int64 values below 2**32; products stay
    below 2**59, so nothing overflows."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def seeded_uniforms(seeds: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, steps] float32 draws in [0, 1) (24 bits, as `torch.rand` gives): row i's draw at decode step t
    is a function of its seed (`seeds` [B] int64, >= 0) and t alone, so a row draws the same numbers
    whatever else runs beside it and whatever was drawn before. A whole call's are made at once (per
    step they cost more than the decode step's sampling).

    >>> u = seeded_uniforms(torch.tensor([1, 2, 2**62 + 5]), 4)
    >>> bool(((u >= 0) & (u < 1)).all()), torch.equal(u[:1, :2], seeded_uniforms(torch.tensor([1]), 2))
    (True, True)
    >>> len(set(u.flatten().tolist()))
    12
    """
    x = _mix32((torch.arange(steps) + 0x9E3779B9) & _MASK32).unsqueeze(0)  # [1, steps]
    x = _mix32(x ^ ((seeds >> 32) & _MASK32).unsqueeze(-1))  # [B, steps]
    x = _mix32(x ^ (seeds & _MASK32).unsqueeze(-1))
    return (x >> 8).to(torch.float32) / float(1 << 24)


def shared_prompts(prompts: list[list[int]], routes: list[torch.Tensor | None] | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(the first row of each distinct prompt, each row's index among those), or (None, None) when no
    two rows share one. Rows share a prompt when its tokens and its known routes are the same: a
    GRPO group's samples. Their prefill is one forward, whose keys, values, last logits and routes
    every row of the group then copies: the computation is the same, done once instead of group-size
    times."""
    index: dict[tuple, int] = {}
    firsts: list[int] = []
    of_row: list[int] = []
    for i, prompt in enumerate(prompts):
        known = None if not routes or routes[i] is None else routes[i].numpy().tobytes()
        key = (tuple(prompt), known)
        if key not in index:
            index[key] = len(firsts)
            firsts.append(i)
        of_row.append(index[key])
    if len(firsts) == len(prompts):
        return None, None
    return torch.tensor(firsts), torch.tensor(of_row)


class HFEngine:
    def __init__(
        self, model_path: str, dtype: str = "float32", seed: int = 0, num_threads: int | None = None, selection_bias: bool = False
    ) -> None:
        """`selection_bias`: the routers carry the learner's auxiliary-loss-free selection bias
        (`moe.balance=aux_free`), which arrives with the weights."""
        from transformers import AutoConfig, AutoModelForCausalLM

        if num_threads:
            torch.set_num_threads(num_threads)
        self.model_path = model_path
        self.dtype = getattr(torch, dtype)
        self.config = AutoConfig.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype).eval()
        self.pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        self.version = 0
        self.stats = EngineStats()
        self._generator = torch.Generator().manual_seed(seed)
        self.selection_bias = selection_bias
        self.routing = self._take_over_routers(self.model)

    # ---- routing record -------------------------------------------------
    def _take_over_routers(self, model: torch.nn.Module) -> Routing | None:
        return Routing(model, self.selection_bias) if find_routers(model) else None

    def _step_routes(self, capture, batch: int) -> torch.Tensor:
        """[B, T, num_moe_layers, top_k] experts of the positions this forward pass ran."""
        per_layer = [rec.used.view(batch, -1, rec.used.shape[-1]) for rec in capture.layers]
        return torch.stack(per_layer, dim=2).to(route_dtype(self.routing.num_experts))

    # ---- generation -----------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        weight_source: WeightSource | None = None,
        max_tokens: list[int] | None = None,
        routes: list[torch.Tensor | None] | None = None,
    ) -> list[Completion]:
        if not prompts:
            return []
        start = time.perf_counter()
        if sampling.seed is not None:
            self._generator.manual_seed(sampling.seed)
        batch = len(prompts)
        if sampling.seeds is not None and len(sampling.seeds) != batch:
            raise ValueError(f"sampling.seeds: {len(sampling.seeds)} seeds for {batch} prompts")
        width = max(len(p) for p in prompts)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding keeps every row's last token at the end
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        stop = torch.tensor(sorted(set(sampling.stop_token_ids)) or [-1])
        replay = self._prefill_replay(routes, prompts, width)  # [B, width, layers, k] or None

        caps = [sampling.max_new_tokens] * batch if max_tokens is None else [min(c, sampling.max_new_tokens) for c in max_tokens]
        draws = None  # [B, steps] each row's own random numbers, or None: the engine's generator
        if sampling.seeds is not None and sampling.temperature > 0:
            draws = seeded_uniforms(torch.tensor(sampling.seeds, dtype=torch.long), max(0, *caps))
        cap = torch.tensor(caps)  # [B]
        produced = torch.zeros(batch, dtype=torch.long)  # [B] tokens each row has sampled so far
        done = cap <= 0  # [B]
        # per step: [B] sampled ids and log-probs (rows already done sample too: cut off at the end), the version
        sampled: list[torch.Tensor] = []
        sampled_logps: list[torch.Tensor] = []
        step_versions: list[int] = []
        steps_routes: list[torch.Tensor] = []  # per forward: [B, T, layers, k], the prefill's first
        cache = None
        step_ids, positions = input_ids, positions_from_mask(mask)
        firsts, of_row = shared_prompts(prompts, routes)
        for step in range(max(caps)):
            if step == 0 and firsts is not None:  # each distinct prompt prefilled once, its cache copied to its rows
                with self._capture(None if replay is None else replay[firsts]) as capture:
                    out = self.model(input_ids=step_ids[firsts], attention_mask=mask[firsts], position_ids=positions[firsts], use_cache=True)
                out.past_key_values.batch_select_indices(of_row)
                logits = out.logits[:, -1][of_row]
                if capture is not None:
                    steps_routes.append(self._step_routes(capture, len(firsts))[of_row])
            else:
                with self._capture(replay if step == 0 else None) as capture:
                    out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
                logits = out.logits[:, -1]
                if capture is not None:
                    steps_routes.append(self._step_routes(capture, batch))
            cache = out.past_key_values
            next_ids, next_logp = self._sample(logits.float(), sampling, None if draws is None else draws[:, step])
            sampled.append(next_ids)
            sampled_logps.append(next_logp)
            step_versions.append(self.version)
            produced += ~done  # a row's tokens are its first `produced` samples: once done, it stays done
            done = done | torch.isin(next_ids, stop) | (produced >= cap)
            if bool(done.all()):
                break
            if weight_source is not None and weight_source():
                self.stats.inflight_updates += 1
            step_ids = next_ids.unsqueeze(-1)
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((batch, 1), dtype=torch.long)], dim=1)

        # rows become Python lists once, here, not element by element at every step
        lengths = produced.tolist()
        all_ids = torch.stack(sampled, dim=1).tolist() if sampled else [[] for _ in range(batch)]  # [B, steps]
        all_logps = torch.stack(sampled_logps, dim=1).tolist() if sampled else [[] for _ in range(batch)]
        tokens = [row[:n] for row, n in zip(all_ids, lengths)]
        logps = [row[:n] for row, n in zip(all_logps, lengths)]
        versions = [step_versions[:n] for n in lengths]
        elapsed = time.perf_counter() - start
        self.stats.generate_seconds += elapsed
        self.stats.generated_tokens += sum(lengths)
        stop_set = set(sampling.stop_token_ids)
        # a row's positions: the prefill's real columns (its last len(prompt)), then the decode steps that
        # fed back its tokens but the last (rows that finished early were fed on: those steps are cut off)
        routes = None
        if steps_routes:
            prefill = steps_routes[0]
            decoded = torch.cat(steps_routes[1:], dim=1) if len(steps_routes) > 1 else prefill[:, :0]
            routes = (prefill, decoded)
        return [
            Completion(
                token_ids=tokens[i],
                logprobs=logps[i],
                versions=versions[i],
                finish_reason="stop" if tokens[i] and tokens[i][-1] in stop_set else "length",
                routed_experts=None if routes is None else self._row_routes(routes, i, width - len(prompts[i]), len(tokens[i])),
            )
            for i in range(batch)
        ]

    @staticmethod
    def _row_routes(routes: tuple[torch.Tensor, torch.Tensor], row: int, pad: int, generated: int) -> torch.Tensor:
        """[prompt + generated - 1, layers, k]: the row's prefill columns after its padding, then its fed-back tokens."""
        prefill, decoded = routes
        return torch.cat([prefill[row, pad:], decoded[row, : max(generated - 1, 0)]])[: prefill.shape[1] - pad + generated - 1]

    def _sample(self, logits: torch.Tensor, sampling: SamplingConfig, uniforms: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids [B], their log-probs [B] under the sampling distribution: temperature, then the top-p
        nucleus), drawn with each row's uniform number (`uniforms` [B]; None: the engine's generator's).

        Greedy decoding (temperature 0) samples from a point mass: log-prob 0."""
        if sampling.temperature <= 0:
            ids = logits.argmax(-1)
            return ids, torch.zeros(ids.shape)
        logp = SamplingPolicy(sampling.temperature, sampling.top_p).log_probs(logits)  # [B, V], the learner's computation
        if uniforms is None:
            uniforms = torch.rand(logp.shape[0], generator=self._generator)
        ids = sample_categorical(logp.exp(), uniforms)
        return ids, logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)

    # ---- weights ----------------------------------------------------------
    def load_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Copy new weights into the live model (the fast path, used between and within batches): one
        `_foreach_copy_` into the model's own tensors, checked by name and shape first."""
        targets = self._targets()
        if state.keys() != targets.keys():
            missing, unexpected = sorted(targets.keys() - state.keys()), sorted(state.keys() - targets.keys())
            raise KeyError(f"weights do not fit the engine's model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        sources = [state[k] for k in targets]
        wrong = [k for (k, t), src in zip(targets.items(), sources) if t.shape != src.shape]
        if wrong:
            raise ValueError(f"weights do not fit the engine's model: shapes differ at {wrong[:3]}")
        with torch.no_grad(), warnings.catch_warnings():  # tensors from Ray's object store are read-only; they are copied
            warnings.simplefilter("ignore", UserWarning)
            torch._foreach_copy_(list(targets.values()), sources)
        self.version = version
        self.stats.weight_loads += 1

    def _targets(self) -> dict[str, torch.Tensor]:
        """The live model's parameters and persistent buffers by state-dict name (taken again after a rebuild)."""
        if getattr(self, "_targets_of", None) is not self.model:
            self._target_tensors, self._targets_of = self.model.state_dict(keep_vars=True), self.model
        return self._target_tensors

    def rebuild(self, state: dict[str, torch.Tensor], version: int) -> None:
        """A fresh model object from the config, then the weights: nothing of the old one survives."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype).eval()
        routing = self._take_over_routers(model)  # first: it adds the selection bias the weights may carry
        self._assign(model, state)
        self.model, self.routing = model, routing
        self.version = version

    @staticmethod
    def _assign(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        with warnings.catch_warnings():  # tensors from Ray's object store are read-only; they are copied
            warnings.simplefilter("ignore", UserWarning)
            missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise KeyError(f"weights do not fit the engine's model: missing {missing[:3]}, unexpected {unexpected[:3]}")

    def _capture(self, replay: torch.Tensor | None = None):
        from contextlib import nullcontext

        return nullcontext() if self.routing is None else self.routing.capture(replay=replay)

    def _prefill_replay(self, routes: list[torch.Tensor | None] | None, prompts: list[list[int]], width: int) -> torch.Tensor | None:
        """[B, width, layers, k] the known routes of each left-padded prompt's first positions, -1 elsewhere."""
        if self.routing is None or not routes or all(r is None for r in routes):
            return None
        shape = (self.routing.num_layers, self.routing.top_k)
        replay = torch.full((len(prompts), width, *shape), -1, dtype=torch.long)
        for i, (prompt, known) in enumerate(zip(prompts, routes)):
            if known is None:
                continue
            if tuple(known.shape[1:]) != shape or known.shape[0] > len(prompt):
                raise ValueError(f"prompt {i}: routes of shape {tuple(known.shape)} for a prompt of {len(prompt)} tokens "
                                 f"(at most [{len(prompt)}, {shape[0]}, {shape[1]}])")
            start = width - len(prompt)
            replay[i, start : start + known.shape[0]] = known.long()
        return replay

    def prompt_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        return probe_logprobs(self.model, token_ids)  # outside a capture: the probe records nothing

    def close(self) -> None:
        self.model = None

