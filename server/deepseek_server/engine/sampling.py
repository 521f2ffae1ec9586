"""Pick the next token of each row with that row's own temperature, top-p and random generator."""

from __future__ import annotations

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
