"""StepPlan -> the tensors a vLLM forward pass reads: tokens, positions, and the
CommonAttentionMetadata its attention builders turn into per-backend metadata.

Rows are sequences, decodes first (as ModelRunner orders them):
    query_start_loc  [num_seqs + 1] int32   row i's tokens: query_start_loc[i]:query_start_loc[i+1]
    seq_lens         [num_seqs] int32       cached tokens after this step (the query is the tail)
    block_table      [num_seqs, max_blocks] int32, 0-padded
    slot_mapping     [num_tokens] int64     block_table[pos // block_size] * block_size + pos % block_size
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import CommonAttentionMetadata

from ..scheduler import ScheduledChunk, StepPlan
from ..sequence import Sequence


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens] long
    positions: torch.Tensor  # [num_tokens] long
    common: CommonAttentionMetadata
    query_start: list[int]  # query_start_loc as a list (the torch fallback reads it)
    seq_lens: list[int]
    sample_rows: list[int]  # hidden-state rows whose logits are sampled
    sample_seqs: list[Sequence]


def _is_decode(chunk: ScheduledChunk) -> bool:
    return chunk.num_tokens == 1 and chunk.seq.num_computed_tokens > 0


def step_inputs(plan: StepPlan, block_size: int, device: torch.device) -> StepInputs:
    chunks = sorted(plan.chunks, key=lambda c: not _is_decode(c))
    ids, positions, slots, starts, lens, tables, rows, seqs = [], [], [], [0], [], [], [], []
    for chunk in chunks:
        seq, start, n = chunk.seq, chunk.seq.num_computed_tokens, chunk.num_tokens
        ids.extend(seq.token_ids[start:start + n])
        positions.extend(range(start, start + n))
        table = seq.block_table
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, start + n))
        starts.append(starts[-1] + n)
        lens.append(start + n)
        tables.append(table[:-(-(start + n) // block_size)])
        if chunk.completes:
            rows.append(starts[-1] - 1)
            seqs.append(seq)
    width = max(len(t) for t in tables)
    block_table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
    query_start_loc = torch.tensor(starts, dtype=torch.int32, device=device)
    common = CommonAttentionMetadata(
        query_start_loc=query_start_loc, query_start_loc_cpu=query_start_loc.cpu(),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device), num_reqs=len(chunks),
        num_actual_tokens=len(ids), max_query_len=max(c.num_tokens for c in chunks), max_seq_len=max(lens),
        block_table_tensor=block_table, slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device))
    return StepInputs(torch.tensor(ids, device=device), torch.tensor(positions, device=device), common,
                      starts, lens, rows, seqs)
