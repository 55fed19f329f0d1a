"""The built-in real model answers a real question."""

from __future__ import annotations

from tokenpool.cli.main import main
from tokenpool.engine.llm_engine import EngineConfig, LLMEngine
from tokenpool.engine.sampling_params import SamplingParams

QUESTION = "What is the capital of France?"


def test_smollm2_answers_paris(smollm2_dir):
    engine = LLMEngine(smollm2_dir, EngineConfig(dtype="bfloat16"))
    seq = engine.generate([QUESTION], SamplingParams(max_tokens=24), chat=True)[0]
    answer = engine.tokenizer.decode(seq.output_token_ids)
    assert "Paris" in answer, answer


def test_generate_command_streams_paris(capsys, smollm2_dir):
    assert main(["generate", "--model", str(smollm2_dir), "--chat", "--max-tokens", "24",
                 QUESTION]) == 0
    assert "Paris" in capsys.readouterr().out
