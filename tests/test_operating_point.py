"""The operating-point report (sim.characterize): GPU time per call from the cost model, with no cache and an
infinite one, and the calls/s a cluster can sustain."""

from __future__ import annotations

import pytest

from sim.characterize import main, model_context_limit, operating_point
from sim.costmodel import make_cost_model
from sim.models import num_gpu_blocks
from traces.schema import make_table
from traces.workflow import make_workload


def test_accounting_follows_the_cost_model():
    """Two identical 10,000-token calls (the second fully cached) on a saturated A100-40GB replica."""
    blocks = list(range(625))
    table = make_table({"request_id": [0, 1], "arrival_s": [0.0, 1.0], "input_tokens": [10_000, 10_000],
                        "output_tokens": [50, 50], "block_hashes": [blocks, blocks], "job_id": [0, 0]})
    cm = make_cost_model("a100-40gb", "llama-3.1-8b", 1)
    p = operating_point(table, "two", cm, num_gpus=8)
    batch = min(256, num_gpu_blocks("a100-40gb", "llama-3.1-8b", 1) * 16 // 10_050)
    chunk, mid = 8192 - batch, 10_025
    step = lambda prefill: cm.step_time(prefill, batch, batch * mid)  # noqa: E731
    decode = 50 * step([]) / batch
    full = step([(chunk, 0)]) - step([]) + step([(10_000 - chunk, chunk)]) - step([])
    one = step([(1, 9_999)]) - step([])  # vLLM recomputes the last token of a fully cached prompt
    assert p.decode_batch == batch and p.prefix_hit_bound == 0.5
    assert p.gpu_s_per_call_no_cache == pytest.approx(full + decode)
    assert p.gpu_s_per_call_inf_cache == pytest.approx((full + one) / 2 + decode)
    assert p.prefill_share_no_cache == pytest.approx(full / (full + decode))
    assert p.max_calls_per_s_no_cache == pytest.approx(8 / (full + decode))
    assert p.calls_per_job == 2 and p.input_over_output == 200

    tp2 = operating_point(table, "two", make_cost_model("a100-40gb", "llama-3.1-8b", 2), num_gpus=8)
    replica_s = tp2.gpu_s_per_call_no_cache / 2
    assert tp2.max_calls_per_s_no_cache == pytest.approx(4 / replica_s)  # 4 replicas of 2 GPUs


def test_agent_workflow_is_prefill_heavy_and_the_chat_one_is_not():
    cm = make_cost_model("a100-40gb", "llama-3.1-8b", 1)
    agent = operating_point(make_workload("coding-assistant", num_jobs=40, seed=0), "coding-assistant", cm, 8)
    chat = operating_point(make_workload("coding-assistant-chat", num_jobs=40, seed=0), "chat", cm, 8)
    assert agent.input_over_output >= 100 and agent.prefill_share_no_cache >= 0.5  # the "done" bar
    assert chat.input_over_output < 20 and chat.prefill_share_no_cache < 0.5
    assert agent.prefix_hit_bound > 0.9 and agent.max_calls_per_s_inf_cache > 3 * agent.max_calls_per_s_no_cache


def test_model_window_and_command_line(capsys, tmp_path):
    assert model_context_limit("llama-3.1-8b") == 131_072 and model_context_limit("llama-2-7b") == 4096
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match=r"config.json: field 'intermediate_size' must be a positive integer"):
        model_context_limit(str(tmp_path))
    assert main(["coding-assistant", "--num-jobs", "5"]) == 0
    out = capsys.readouterr().out
    assert "context limit 131,072 tokens" in out and "| coding-assistant | " in out and "61 ms" in out
    assert main(["software-team", "--num-jobs", "20", "--scale-to", "2048,20"]) == 0  # the paper's ~2 K prompts
    assert "| software-team @ 2048/20 | " in capsys.readouterr().out
    assert main(["claude-code-v8", "--scale-to", "2048,20"]) == 2
    assert "only workflows can be rescaled" in capsys.readouterr().err
    # the agent workflow's system prompt, summary and longest outputs do not fit Llama-2-7B's 4 K window
    assert main(["coding-assistant", "--num-jobs", "5", "--model", "llama-2-7b"]) == 2
    err = capsys.readouterr().err
    assert "workflow 'coding-assistant'" in err and "context limit of 4096 tokens" in err
