"""Sampler: turns logits into next tokens, per request's SamplingParams.

Seeded sampling draws each token from a generator seeded by (seed, token index),
so a request's tokens depend only on its own logits and seed — not on the batch
it shares, on preemption, or on which instance computes the step.

Before a token is picked, greedy or sampled, a request's logits are adjusted in vLLM's order:
its logit_bias added (OpenAI's), then the repetition penalty applied to the tokens of its prompt
and output (vLLM's), then the presence and frequency penalties (OpenAI's) subtracted for the
tokens it has generated so far. A request dispatched again after a failure counts the tokens it
streamed before (the end of its new prompt: seed_offset of them) as generated, so its tokens are
the undisturbed run's. Log-probabilities stay those of the raw logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sequence import Sequence

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads consecutive indices apart


def token_seed(seed: int, index: int) -> int:
    return (seed * _MIX + index + 1) % (2**63)


def generated_tokens(seq: Sequence) -> list[int]:
    """Every token the request generated: before a re-dispatch (its prompt's last seed_offset) and since."""
    offset = seq.sampling.seed_offset
    return (seq.prompt_token_ids[-offset:] if offset else []) + seq.output_token_ids


def _adjusted(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits with each adjusted row changed (a copy; logits itself when no row is)."""
    rows = [i for i, s in enumerate(seqs) if s.sampling.adjusts_logits]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[1]
    for i in rows:
        seq, row = seqs[i], logits[i]
        sampling = seq.sampling
        if sampling.logit_bias:
            ids, biases = zip(*sampling.logit_bias, strict=True)
            row[torch.tensor(ids)] += torch.tensor(biases, dtype=row.dtype)
        if sampling.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.prompt_token_ids) | set(seq.output_token_ids)))
            values = row[seen]
            p = sampling.repetition_penalty
            row[seen] = torch.where(values > 0, values / p, values * p)
        generated = generated_tokens(seq)
        if (sampling.frequency_penalty or sampling.presence_penalty) and generated:
            counts = torch.bincount(torch.tensor(generated), minlength=vocab)[:vocab].to(row.dtype)
            row -= sampling.frequency_penalty * counts + sampling.presence_penalty * (counts > 0)
    return logits


@dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's log-probability and the most likely tokens' (id, logprob), best first,
    under the raw logits' distribution (before temperature, top-k and top-p, as vLLM reports)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class Sampler:
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits: [n, vocab] float32, one row per sequence -> n token ids."""
        logits = _adjusted(logits.cpu(), seqs)  # seeded draws use CPU generators: any device alike
        tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, s in enumerate(seqs) if not s.sampling.greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows)
            probs = self._probs(logits[rows], [seqs[i] for i in sampled_rows])
            for j, i in enumerate(sampled_rows):
                seq = seqs[i]
                index = seq.sampling.seed_offset + seq.num_output_tokens
                gen = torch.Generator().manual_seed(token_seed(seq.seed, index))
                tokens[i] = torch.multinomial(probs[j], 1, generator=gen)[0]
        return tokens.tolist()

    @staticmethod
    def logprobs(logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> dict[str, TokenLogprobs]:
        """request_id -> TokenLogprobs for the rows whose request asked for them."""
        rows = [i for i, s in enumerate(seqs) if s.sampling.logprobs is not None]
        if not rows:
            return {}
        logp = logits[torch.tensor(rows)].cpu().float().log_softmax(dim=-1)  # [len(rows), vocab]
        k = max(seqs[i].sampling.logprobs for i in rows)
        top_values, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
        found = {}
        for j, i in enumerate(rows):
            want = seqs[i].sampling.logprobs
            top = tuple(zip(top_ids[j, :want].tolist(), top_values[j, :want].tolist(), strict=True))
            found[seqs[i].request_id] = TokenLogprobs(logp[j, tokens[i]].item(), top)
        return found

    @staticmethod
    def _probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        temps = torch.tensor([s.sampling.temperature for s in seqs]).unsqueeze(1)
        logits = logits / temps
        top_k = torch.tensor([s.sampling.top_k or logits.shape[1] for s in seqs])
        top_p = torch.tensor([s.sampling.top_p for s in seqs])
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(logits.shape[1])
        drop = ranks.unsqueeze(0) >= top_k.unsqueeze(1)
        sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # Drop a token once the mass before it already reaches top_p (the first always stays).
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop |= mass_before >= top_p.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        filtered = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
        return filtered.softmax(dim=-1)
