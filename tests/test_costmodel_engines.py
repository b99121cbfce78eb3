"""Engine generations (vLLM v0/v1), MoE and quantized models, KV sizing as vLLM does it, and the calibration files."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from sim.calibration import v1_error_table
from sim.costmodel import CostModel, cudagraph_capture_sizes, main, make_cost_model, moe_experts_time
from sim.hardware import (
    CALIBRATIONS_DIR,
    GPU_ENGINES,
    GiB,
    engine_from_json,
    engine_to_json,
    get_gpu,
    kernels_from_json,
    kernels_to_json,
    load_engine,
    read_calibration,
)
from sim.models import activation_peak_bytes, default_activation_reserve, load_model, num_gpu_blocks

# ---- vLLM v1 against its public measurements -----------------------------------------------------------------------


def test_every_targeted_public_v1_point_within_10_percent():
    table = v1_error_table()
    targeted = table[table["target"]]
    assert len(targeted) >= 3 and set(targeted["gpu"]) >= {"h100-80gb", "a100-40gb"}
    bad = targeted[targeted["error"].abs() > 0.10]
    assert bad.empty, bad.to_string()
    for row in table.itertuples():  # every point names where it comes from
        assert row.url.startswith("https://") and row.vllm and row.source


def test_memory_bound_decode_follows_bandwidth_under_v1_but_not_v0():
    """H200 has 4.8/3.35 = 1.43x the H100's bandwidth; a batch-1 decode of an 8B model is memory-bound. vLLM v0's
    launch floor hides that (both ~18 ms); v1's CUDA graphs do not."""
    ratio = {}
    for engine in GPU_ENGINES:
        h100, h200 = (make_cost_model(g, "llama-3.1-8b", 1, engine).step_time((), 1, 1024)
                      for g in ("h100-80gb", "h200"))
        ratio[engine] = h100 / h200
    bandwidth = get_gpu("h200").hbm_bandwidth / get_gpu("h100-80gb").hbm_bandwidth
    assert ratio["vllm-v1"] == pytest.approx(bandwidth, rel=0.10)
    assert ratio["vllm-v0"] < 1.05


def test_v1_is_the_default_engine_and_faster_on_small_batches():
    default, v0 = make_cost_model(), make_cost_model(engine="vllm-v0")
    assert default.engine.name == "vllm-v1" and default == make_cost_model("a100-40gb", "llama-3.1-8b", 1, "vllm-v1")
    assert default.step_time((), 1, 1024) < 0.75 * v0.step_time((), 1, 1024)
    assert CostModel(get_gpu("a100-40gb"), load_model("llama-3.1-8b"), 1) == default  # positional form still works


# ---- CUDA graphs and overlapped scheduling -------------------------------------------------------------------------


def test_capture_sizes_follow_vllm_defaults():
    # vLLM's log for the defaults (max_num_seqs 256): "PIECEWISE=51 (largest=512), FULL=35 (largest=256)"
    sizes = cudagraph_capture_sizes(512, 256, 8192)
    assert len(sizes) == 51 and sizes[-1] == 512 and sizes[:5] == (1, 2, 4, 8, 16)
    assert len([s for s in sizes if s <= 256]) == 35
    small = cudagraph_capture_sizes(512, 100, 8192)
    assert small[-1] == 200 and 100 in small and 104 in small  # up to 2 x max_num_seqs, max_num_seqs itself
    assert cudagraph_capture_sizes(512, 256, 64)[-1] == 64  # capped by max_num_batched_tokens


def test_decode_batches_pad_to_a_capture_size_and_eager_runs_above():
    cm = make_cost_model("a100-80gb", "llama-3.1-8b", 1, max_num_seqs=1024)
    assert cm.mode(False, 9) == "full CUDA graph, padded to 16 tokens"
    assert cm.mode(False, 513) == "eager" and cm.mode(True, 600) == "eager"
    assert cm.mode(True, 300) == "piecewise CUDA graph, padded to 304 tokens"
    # the GEMMs of batch 9 cost what batch 16's do: only attention (the real contexts) differs
    b9, b16 = cm.breakdown((), 9, 9 * 100), cm.breakdown((), 16, 16 * 100)
    assert b9["linear"] == b16["linear"] and b9["lm_head"] == b16["lm_head"]
    assert b9["launch_stall"] == 0.0
    eager = cm.breakdown((), 600, 600 * 100)
    assert eager["launch_stall"] >= 0.0 and cm.step_time((), 600, 60000) > cm.step_time((), 512, 51200)
    assert make_cost_model(engine="vllm-v0").mode(False, 1) == "eager"


def test_v1_cpu_time_overlaps_the_gpu_and_v0_adds_it():
    tiny = load_model("tiny-llama")  # a model so small that the engine's CPU time dominates
    gpu = get_gpu("a100-40gb")
    v1, v0 = CostModel(gpu, tiny, 1, load_engine("vllm-v1")), CostModel(gpu, tiny, 1, load_engine("vllm-v0"))
    assert v1.step_time((), 4, 400) == v1.cpu(4)  # CPU-bound: the GPU step hides under it
    parts = v0.breakdown((), 4, 400)
    assert v0.step_time((), 4, 400) == pytest.approx(1e-3 * sum(parts.values()), rel=1e-12)
    assert parts["cpu_overhead"] == pytest.approx(1e3 * v0.cpu(4))


def test_api_overhead_is_exposed_as_data():
    v1 = make_cost_model().api_overhead
    assert 0.0 < v1.before_first_token_s < 0.02 and 0.0 < v1.after_finish_s < 0.02
    assert make_cost_model(engine="vllm-v0").api_overhead.before_first_token_s == 0.0
    cpu = make_cost_model("cpu-core", "tiny-llama").api_overhead
    assert cpu == load_engine("vllm-cpu").api_overhead


def test_unknown_engine_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown engine 'vllm-v2' for a100-40gb; known engines: vllm-v0, vllm-v1"):
        make_cost_model(engine="vllm-v2")
    with pytest.raises(ValueError, match="known engines: vllm-cpu"):
        make_cost_model("cpu-core", "tiny-llama", 1, "vllm-v1")


def test_cli_engine_flag(capsys):
    assert main(["--engine", "vllm-v0", "--decode-batch", "8", "--context", "100"]) == 0
    out = capsys.readouterr().out
    ms = 1e3 * make_cost_model(engine="vllm-v0").step_time((), 8, 800)
    assert "(vllm-v0)" in out and f"step time: {ms:.3f} ms (eager)" in out
    assert main(["--decode-batch", "8", "--context", "100", "--kv-cache-dtype", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "(vllm-v1)" in out and "full CUDA graph, padded to 8 tokens" in out and "API overhead per call" in out
    blocks = num_gpu_blocks("a100-40gb", "llama-3.1-8b", 1, kv_cache_dtype="fp8")
    assert f"KV capacity: {blocks} blocks" in out


# ---- MoE and quantization ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,billions,active", [("mixtral-8x7b", 46.70, 12.88), ("qwen3-30b-a3b", 30.53, 3.35)])
def test_moe_parameter_counts(name, billions, active):
    m = load_model(name)
    assert m.is_moe and m.weight_bytes(1) / m.dtype_bytes / 1e9 == pytest.approx(billions, rel=5e-3)
    expert = m.mlp_params(1, m.moe_intermediate_size)
    active_params = m.weight_bytes(1) / m.dtype_bytes - m.num_layers * (m.num_experts - m.experts_per_token) * expert
    assert active_params / 1e9 == pytest.approx(active, rel=0.02)


def test_moe_streams_the_experts_a_batch_touches_and_computes_the_routed_tokens():
    m, gpu = load_model("mixtral-8x7b"), get_gpu("a100-80gb")
    assert m.expected_active_experts(1) == pytest.approx(2.0)  # one token: its two experts
    assert m.expected_active_experts(2) == pytest.approx(8 * (1 - (6 / 8) ** 2))
    assert m.expected_active_experts(512) == pytest.approx(8.0)
    # one token: the time to stream two experts' weights (gate+up and down, bf16), compute negligible
    k = gpu.kernels
    expert_bytes = 3 * m.hidden_size * m.moe_intermediate_size * m.dtype_bytes
    one = moe_experts_time(gpu, m, 1, 1) - 2 * k.gemm_kernel_s
    assert one == pytest.approx(2 * expert_bytes / (gpu.hbm_bandwidth * k.gemm_bw_eff), rel=0.01)
    # many tokens: compute-bound on the routed copies (tokens x 2), not on all 8 experts
    tokens = 16384
    flops = 2.0 * tokens * 2 * 3 * m.hidden_size * m.moe_intermediate_size
    busy = moe_experts_time(gpu, m, 1, tokens)
    assert busy == pytest.approx(flops / (gpu.peak_flops * k.gemm_flops_eff), rel=0.10)
    # a decode step of 1 sequence costs about the active 13B, not the 47B
    moe = make_cost_model("a100-80gb", "mixtral-8x7b", 2).linear(1)
    dense = make_cost_model("a100-80gb", "llama-2-70b", 2).linear(1)
    assert moe < 0.3 * dense


def test_awq_weights_are_4_bit_with_group_scales():
    awq, bf16 = load_model("llama-3.1-8b-awq"), load_model("llama-3.1-8b")
    assert awq.quant.name == "awq" and (awq.weight_bits, awq.quant_group_size, awq.quant_zero_point) == (4, 128, True)
    per_param = 0.5 + (2 + 0.5) / 128  # 4-bit weight + fp16 scale and 4-bit zero per group of 128
    embeddings_and_norms = bf16.weight_bytes(1) - bf16.linear_params(1) * 2
    assert awq.weight_bytes(1) == pytest.approx(awq.linear_params(1) * per_param + embeddings_and_norms, rel=1e-6)
    assert awq.weight_bytes(1) / GiB == pytest.approx(5.34, abs=0.05)  # vLLM logs ~5.37 GB loaded for this model
    # memory-bound decode streams ~4x fewer linear bytes; compute-bound prefill is not faster
    a, b = make_cost_model("a100-40gb", "llama-3.1-8b-awq"), make_cost_model("a100-40gb", "llama-3.1-8b")
    assert a.linear(1) < 0.4 * b.linear(1)
    assert a.linear(8192) >= b.linear(8192)


def test_fp8_weights_double_the_peak_only_on_fp8_tensor_cores(tmp_path):
    cfg = json.loads((CALIBRATIONS_DIR.parent / "models" / "llama-3.1-8b.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    fp8 = load_model(tmp_path)
    assert fp8.weight_bits == 8 and fp8.gemm_flops_scale(True) == 2.0 and fp8.gemm_flops_scale(False) < 1.0
    h100 = CostModel(get_gpu("h100-80gb"), fp8, 1).linear(16384)
    assert h100 < 0.7 * make_cost_model("h100-80gb", "llama-3.1-8b").linear(16384)


@pytest.mark.parametrize(
    "patch,field",
    [
        ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config.quant_method"),
        ({"quantization_config": {"quant_method": "gptq", "bits": 3}}, "quantization_config.bits"),
        ({"kv_lora_rank": 512}, "kv_lora_rank"),
        ({"sliding_window": 4096}, "sliding_window"),
        ({"num_local_experts": 8}, "num_experts_per_tok"),
        ({"num_local_experts": 2, "num_experts_per_tok": 4}, "num_experts_per_tok=4 exceeds"),
    ],
)
def test_features_the_model_cannot_cost_are_refused_by_name(tmp_path, patch, field):
    cfg = json.loads((CALIBRATIONS_DIR.parent / "models" / "llama-3.1-8b.json").read_text())
    cfg.update(patch)
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"odd\.json.*{field}"):
        load_model(path)


# ---- KV capacity as vLLM v1 sizes it -------------------------------------------------------------------------------


def test_kv_capacity_follows_vllm_v1s_profile():
    """ceil(total x util) - weights - (non-torch + activation peak + CUDA graphs), in whole blocks."""
    gpu, m, e = get_gpu("a100-80gb"), load_model("llama-3.1-8b"), load_engine("vllm-v1")
    reserve = e.non_torch_bytes + activation_peak_bytes(m, 1, 8192, 256) + e.cudagraph_memory_bytes
    free = math.ceil(gpu.memory_bytes * 0.9) - m.weight_bytes(1) - reserve
    assert num_gpu_blocks(gpu, m, 1) == free // (16 * m.kv_bytes_per_token(1))
    # vLLM (before it counted CUDA graphs) logged 447,088 tokens for this model on an 80 GB GPU
    without_graphs = (free + e.cudagraph_memory_bytes) // m.kv_bytes_per_token(1)
    assert without_graphs == pytest.approx(447_088, rel=0.01)
    # the activation peak of the profiling run: vLLM logs 1.19-1.24 GiB at the default 8,192 tokens
    assert activation_peak_bytes(m, 1) / GiB == pytest.approx(1.2, rel=0.1)


def test_kv_capacity_depends_on_max_num_batched_tokens_and_kv_dtype():
    m = load_model("llama-3.1-8b")
    blocks = {t: num_gpu_blocks("a100-40gb", m, 1, max_num_batched_tokens=t) for t in (2048, 8192, 32768)}
    assert blocks[2048] > blocks[8192] > blocks[32768]
    per_token = 2 * 4096 + m.qkv_width(1) + m.mlp_up_width(1) + 14336  # hidden, residual, QKV, gate+up, act
    shrink = (blocks[8192] - blocks[32768]) * 16 * m.kv_bytes_per_token(1)
    assert shrink == pytest.approx(24576 * per_token * 2, rel=0.01)
    fp8 = num_gpu_blocks("a100-40gb", m, 1, kv_cache_dtype="fp8")
    assert m.kv_bytes_per_token(1, "fp8") * 2 == m.kv_bytes_per_token(1) and abs(fp8 - 2 * blocks[8192]) <= 1
    with pytest.raises(ValueError, match="kv_cache_dtype 'int4' unknown"):
        num_gpu_blocks("a100-40gb", m, 1, kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="max_num_batched_tokens and max_num_seqs must be >= 1"):
        num_gpu_blocks("a100-40gb", m, 1, max_num_batched_tokens=0)


def test_vidur_reference_capacity_under_each_engine():
    """Vidur's reference run (Llama-2-70B, tp 2, A100-80GB, block 16) has 3,328 blocks: it counts 80 GiB and weights
    only. vLLM also loses the driver's share of the 80 GiB, the profiling run's activations, non-torch buffers and
    (v1) the CUDA graphs' memory, so it holds fewer."""
    m = load_model("llama-2-70b")
    v0, v1 = (num_gpu_blocks("a100-80gb", m, 2, engine=e) for e in GPU_ENGINES)
    assert v1 < v0 < 3328
    e = load_engine("vllm-v1")
    graphs_and_nccl = e.cudagraph_memory_bytes + e.non_torch_bytes_tp - load_engine("vllm-v0").non_torch_bytes_tp
    assert (v0 - v1) * 16 * m.kv_bytes_per_token(2) == pytest.approx(graphs_and_nccl, abs=16 * m.kv_bytes_per_token(2))
    assert default_activation_reserve(m, 2, engine=e) > default_activation_reserve(m, 1, engine=e) / 2


# ---- calibrations are data files -----------------------------------------------------------------------------------


def test_calibration_files_round_trip():
    for path in sorted(CALIBRATIONS_DIR.glob("*.json")):
        data = read_calibration(path)
        assert path.read_text() == json.dumps(data, indent=1, sort_keys=True) + "\n"  # the one writer's format
        if "kernels" in data:
            assert kernels_to_json(kernels_from_json(data["kernels"], path)) == data["kernels"]
        if "engine" in data:
            assert engine_to_json(engine_from_json(data["engine"], path)) == data["engine"]


def test_a_broken_calibration_file_is_refused_naming_the_field(tmp_path):
    data = read_calibration(CALIBRATIONS_DIR / "engine-vllm-v1.json")["engine"]
    broken = dict(data, graph_kernel_scal=0.5)
    del broken["graph_kernel_scale"]
    path = tmp_path / "engine-x.json"
    with pytest.raises(ValueError, match=r"engine-x\.json: section 'engine': missing fields \['graph_kernel_scale'\], "
                                         r"unknown \['graph_kernel_scal'\]"):
        engine_from_json(broken, path)
    path.write_text("{")
    with pytest.raises(ValueError, match=r"engine-x\.json: not valid JSON"):
        read_calibration(path)


def test_cost_model_reads_the_engine_file_it_names():
    e = dataclasses.replace(load_engine("vllm-v1"), graph_kernel_scale=0.0)
    cm = CostModel(get_gpu("a100-40gb"), load_model("llama-3.1-8b"), 1, e)
    assert cm.step_time((), 1, 1000) < make_cost_model().step_time((), 1, 1000)


# ---- the CPU-core calibration (experiments.calibrate_cpu), on synthetic measurements --------------------------------


def test_cpu_fit_recovers_the_constants_that_made_the_samples():
    from experiments.calibrate_cpu import CACHED_PREFILLS, DECODE_POINTS, FREE_ENGINE, FREE_KERNELS, Sample, fit

    gpu, m = get_gpu("cpu-core"), load_model("tiny-llama")
    truth_k = dataclasses.replace(gpu.kernels, gemm_flops_eff=0.2, prefill_attn_kernel_s=0.004)
    truth_e = dataclasses.replace(gpu.engine(), cpu_step_s=0.005)
    cm = CostModel(dataclasses.replace(gpu, kernels=truth_k), m, 1, truth_e)
    samples = [Sample("prefill", n, c, cm.step_time([(n, c)], 0, 0))
               for n, c in [(16, 0), (256, 0), (1024, 0), (1984, 0), *CACHED_PREFILLS]]
    samples += [Sample("decode", b, c, cm.step_time((), b, b * c)) for b, c in DECODE_POINTS]
    kernels, engine = fit(samples, "tiny-llama")
    fitted = CostModel(dataclasses.replace(gpu, kernels=kernels), m, 1, engine)
    for s in samples:
        predicted = fitted.step_time([(s.new, s.cached)], 0, 0) if s.kind == "prefill" else \
            fitted.step_time((), s.new, s.new * s.cached)
        assert predicted == pytest.approx(s.seconds, rel=0.02)
    assert set(FREE_KERNELS) <= {f.name for f in dataclasses.fields(kernels)}
    assert set(FREE_ENGINE) <= {f.name for f in dataclasses.fields(engine)}


def test_api_overhead_is_what_the_client_saw_beyond_the_engine():
    from experiments.calibrate_cpu import Front, api_overhead

    fronts = [Front(calls=10, client_ttft=1.0, client_after_first=5.0, engine_before_first=0.7, engine_decode=4.8),
              Front(calls=30, client_ttft=2.0, client_after_first=9.0, engine_before_first=1.5, engine_decode=8.6)]
    api = api_overhead(fronts)
    assert api.before_first_token_s == pytest.approx((0.3 + 0.5) / 40)
    assert api.after_finish_s == pytest.approx((0.2 + 0.4) / 40)
