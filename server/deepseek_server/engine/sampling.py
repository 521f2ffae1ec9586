"""Pick the next token of each row with that row's own temperature, top-p and random generator."""

from __future__ import annotations

from typing import Any

import torch


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy when temperature is 0; otherwise nucleus sampling from softmax(logits / temperature)."""
    if temperature <= 0.0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
        drop = cumulative - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs.cpu(), 1, generator=generator)
        return int(order[choice.to(order.device)].item())
    return int(torch.multinomial(probs.cpu(), 1, generator=generator).item())


def sample_rows(
    logits: torch.Tensor,
    rows: list[int],
    temperatures: list[float],
    top_ps: list[float],
    generators: list[torch.Generator | None],
    shared: torch.Generator,
) -> dict[int, int]:
    """Next token of each row in `rows` (indexes into `logits`); vectorized except for rows with their own seed.

    Greedy rows take one argmax together; unseeded sampled rows share one softmax/top-p/multinomial over the shared
    generator; rows with a generator (a request `seed`) are sampled alone so their output depends only on the seed.
    """
    picked: dict[int, int] = {}
    greedy = [r for r in rows if temperatures[r] <= 0.0]
    seeded = [r for r in rows if temperatures[r] > 0.0 and generators[r] is not None]
    pooled = [r for r in rows if temperatures[r] > 0.0 and generators[r] is None]
    if greedy:
        for r, token in zip(greedy, logits[greedy].argmax(dim=-1).tolist(), strict=True):
            picked[r] = int(token)
    for r in seeded:
        picked[r] = sample_next(logits[r], temperatures[r], top_ps[r], generators[r])
    if pooled:
        temps = torch.tensor([temperatures[r] for r in pooled], dtype=torch.float32, device=logits.device)
        probs = torch.softmax(logits[pooled].float() / temps.unsqueeze(1), dim=-1)
        sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        limits = torch.tensor([top_ps[r] for r in pooled], dtype=torch.float32, device=logits.device).unsqueeze(1)
        sorted_probs = sorted_probs.masked_fill(cumulative - sorted_probs >= limits, 0.0)
        choice = torch.multinomial(sorted_probs.cpu(), 1, generator=shared).to(order.device)
        tokens = order.gather(1, choice).squeeze(1).tolist()
        for r, token in zip(pooled, tokens, strict=True):
            picked[r] = int(token)
    return picked


def penalize(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's presence and frequency penalties: subtract `frequency` per time a token was generated and
    `presence` once if it was generated at all. `counts`: how often each token id appeared in the output so far."""
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def bias(logits: torch.Tensor, logit_bias: tuple[tuple[int, float], ...]) -> torch.Tensor:
    """Add each (token id, bias) pair to the logits; -100 effectively bans a token and 100 all but forces it."""
    if not logit_bias:
        return logits
    ids = torch.tensor([token for token, _ in logit_bias], dtype=torch.long, device=logits.device)
    values = torch.tensor([value for _, value in logit_bias], dtype=logits.dtype, device=logits.device)
    return logits.index_add(0, ids, values)


def top_logprobs(logits: torch.Tensor, token: int, alternatives: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` under softmax(logits), and the `alternatives` most likely (id, logprob)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = float(logprobs[token].item())
    if alternatives <= 0:
        return chosen, []
    values, ids = torch.topk(logprobs, min(alternatives, int(logprobs.shape[-1])))
    return chosen, [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]


# The generation-config fields vLLM takes as a request's defaults (`--generation-config auto`, its default), with the
# values that mean "not set": those the builtin engine applies, and those it has no sampler for
APPLIED_DEFAULTS = {"temperature": 1.0, "top_p": 1.0}
UNAPPLIED_DEFAULTS = {"top_k": (0, 50, None), "min_p": (0.0, None), "repetition_penalty": (1.0, None)}


def model_sampling_defaults(generation_config: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """(defaults the builtin engine applies to a request that does not set them, set fields it cannot apply) from a
    model's generation config (`generation_config.json`), as vLLM reads it: a request without `temperature` or
    `top_p` gets the model's own (DeepSeek-R1's distills ship 0.6 and 0.95), not 1.0."""
    applied: dict[str, float] = {}
    for name, unset in APPLIED_DEFAULTS.items():
        value = getattr(generation_config, name, None)
        if isinstance(value, int | float) and not isinstance(value, bool) and value != unset:
            applied[name] = float(value)
    unapplied = {name: value for name, unsets in UNAPPLIED_DEFAULTS.items()
                 if (value := getattr(generation_config, name, None)) not in unsets}
    return applied, unapplied
