"""Fast smoke runs of the benchmark suite on the tiny model: the reports carry their fields,
and the comparisons point the right way (in work done, not wall time: timings are for the
benchmarks themselves)."""
import json
import math

import pytest

from benchmarks import agent_prefix, latency, readme, report, throughput, tool_calling
from benchmarks.report import markdown_table
from benchmarks.systems import run_engine
from benchmarks.workloads import agent_sessions, fixed_length, load_workload, poisson_arrivals, synthetic
from engine import LLM

TINY = dict(dtype="float32", num_kv_blocks=512, max_model_len=1024)


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path)
    return tmp_path


def test_static_batching_needs_more_forward_passes_than_continuous_on_a_mixed_workload():
    items = load_workload("mixed_chat_128", 12)
    results = {}
    for policy in ("continuous", "static"):
        llm = LLM("dummy-tiny", scheduling_policy=policy, max_num_seqs=4, **TINY)
        prompts = [llm.tokenizer.encode(llm.engine.apply_chat_template(it.messages), add_special_tokens=False)
                   for it in items]
        results[policy] = run_engine(llm, prompts, [min(it.max_tokens, 200) for it in items], policy)
    c, s = results["continuous"], results["static"]
    assert c.output_tokens == s.output_tokens == sum(min(it.max_tokens, 200) for it in items)
    assert s.engine["steps"] > 1.2 * c.engine["steps"]
    # static keeps finished members in the batch as padding: more rows per step on average
    assert s.engine["batch_size_mean"] > c.engine["batch_size_mean"]
    assert c.engine["batch_size_peak"] == s.engine["batch_size_peak"] == 4


LATENCY_KEYS = {"ttft", "itl", "tpot", "e2e"}


def _check_summaries(latency: dict) -> None:
    assert LATENCY_KEYS <= set(latency)
    for name in LATENCY_KEYS:
        s = latency[name]
        assert 0 <= s["p50"] <= s["p90"] <= s["p99"], name


def test_throughput_scenario_reports_every_system_with_latency_and_engine_figures(results_dir):
    data = throughput.main(["--model", "dummy-tiny", "--limit", "5", "--skip-transformers", "--fixed-requests", "3",
                            "--sequential-requests", "2", "--single-tokens", "8"])
    runs = data["runs"]
    assert set(runs) == {"continuous", "online", "http", "static", "sequential"}
    expected = sum(it.max_tokens for it in load_workload("mixed_chat_128", 5))
    for key, run in runs.items():
        assert run["output_tokens"] == (expected if key != "sequential" else run["output_tokens"]) > 0
        assert run["output_tokens_per_s"] > 0 and run["total_tokens_per_s"] > run["output_tokens_per_s"]
        _check_summaries(run["latency"])
    for key in ("continuous", "online", "static", "sequential"):
        eng = runs[key]["engine"]
        assert 0 < eng["kv_usage_peak"] <= 1 and eng["preemptions"] == 0
        assert eng["batch_size_peak"] == (1 if key == "sequential" else 5)
        assert len(eng["timeline"]) == eng["steps"]
    assert runs["sequential"]["num_requests"] == 2
    assert data["single"]["engine"]["output_tokens"] == 8
    assert set(data["fixed"]) == {"continuous", "static"}
    for name in ("throughput.md", "throughput.png", "batch_size.png"):
        assert (results_dir / name).stat().st_size > 0
    # where and on which kernels it ran, in the report itself
    from engine.platform import current_platform
    report, level = (results_dir / "throughput.md").read_text(), current_platform("cpu").isa
    assert f"ISA level {level}" in report and "fused decode layers" in report
    assert f"Kernels ({level} level, " in report and f"decode_attention {level}_" in report
    saved = json.loads(next(results_dir.glob("throughput-*.json")).read_text())
    assert saved["interrupted"] is False and saved["runs"]["http"]["latency"]["ttft"]["p99"] > 0


def test_ctrl_c_keeps_what_was_measured(results_dir, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(throughput, "run_sequential", interrupt)
    with pytest.raises(KeyboardInterrupt):
        throughput.main(["--model", "dummy-tiny", "--limit", "3", "--skip-transformers", "--skip-http",
                         "--fixed-requests", "2", "--single-tokens", "4"])
    saved = json.loads(next(results_dir.glob("throughput-*.json")).read_text())
    assert saved["interrupted"] is True
    assert saved["runs"]["continuous"]["output_tokens"] > 0 and "static" not in saved["runs"]
    assert "interrupted" in (results_dir / "throughput.md").read_text()


def test_latency_scenario_sustains_each_rate_and_reports_goodput(results_dir):
    data = latency.main(["--model", "dummy-tiny", "--rates", "20,100", "--duration", "0.3", "--warmup", "0.1",
                         "--search-steps", "1", "--ttft-bound", "30", "--itl-bound", "30"])
    for policy in ("continuous", "static"):
        for point in data["points"][policy]:
            _check_summaries(point["latency"])
            assert point["engine"]["batch_size_peak"] >= 1
            # rate x (warm-up + duration) arrivals; those in the warm-up are not counted
            assert point["num_requests"] == math.ceil(point["rate"] * 0.4)
            assert 0 < point["extra"]["measured_requests"] < point["num_requests"]
            assert point["engine"]["prefix_cache_hit_rate"] < 0.9  # unique prompts on a fresh engine
    assert data["search"] == {"rate": 100.0, "all_passed": True}
    assert "Goodput" in (results_dir / "latency.md").read_text()
    assert (results_dir / "latency.png").stat().st_size > 0


def test_rate_search_picks_the_last_rate_meeting_both_bounds():
    def point(rate, ttft, itl=0.01):
        return {"rate": rate, "latency": {"ttft": {"p99": ttft}, "itl": {"p99": itl}}}
    points = [point(1, 0.1), point(2, 0.2), point(4, 3.0), point(8, 9.0)]
    assert latency.highest_passing(points, "rate", 1.0) == (2, 4)
    assert latency.highest_passing(points, "rate", 10.0) == (8, None)
    assert latency.highest_passing(points, "rate", 0.05) == (None, 1)
    points = [point(1, 0.1), point(2, 0.2, itl=0.5), point(4, 0.3)]  # the ITL bound counts too
    assert latency.highest_passing(points, "rate", 1.0, 0.2) == (4, None)
    assert latency.highest_passing(points[:2], "rate", 1.0, 0.2) == (1, 2)


def test_closed_loop_keeps_at_most_n_requests_in_flight(results_dir):
    data = latency.main(["--model", "dummy-tiny", "--requests", "6", "--concurrency", "2"])
    for policy in ("continuous", "static"):
        (point,) = data["points"][policy]
        assert point["concurrency"] == 2 and point["engine"]["batch_size_peak"] <= 2


def test_agent_workload_prefix_caching_computes_fewer_prefill_tokens():
    off = agent_prefix.run("dummy-tiny", 3, 3, 8, False, **TINY)
    on = agent_prefix.run("dummy-tiny", 3, 3, 8, True, **TINY)
    assert on["prompt_tokens_sent"] > 0 and off["prefill_tokens_computed"] == off["prompt_tokens_sent"]
    assert on["prefill_tokens_computed"] < 0.6 * off["prefill_tokens_computed"]
    assert on["hit_rate"] > 0.4 and off["hit_rate"] == 0


def test_readme_block_is_replaced_between_its_markers_only():
    text = f"intro\n{readme.BEGIN}\nold figures\n{readme.END}\noutro\n"
    out = readme.splice(text, "new figures")
    assert out == f"intro\n{readme.BEGIN}\nnew figures\n{readme.END}\noutro\n"
    with pytest.raises(ValueError, match="benchmarks:begin"):
        readme.splice("no markers", "x")


def test_workload_generators_are_reproducible():
    assert synthetic(5, seed=3) == synthetic(5, seed=3) != synthetic(5, seed=4)
    arrivals = poisson_arrivals(200, rate=10.0, seed=1)
    assert arrivals == sorted(arrivals) and 10 < arrivals[-1] < 30
    assert len(agent_sessions(4, 3)) == 4 and len(agent_sessions(4, 3)[0]) == 3
    fixed = fixed_length(3, prompt_words=10, output_tokens=7)
    assert {it.max_tokens for it in fixed} == {7} and len({len(it.messages[0]["content"]) for it in fixed}) == 1
    assert "| a |" in markdown_table(["a"], [[1.0]])


def test_tool_calling_scenario_scores_every_mode_and_measures_the_grammar_cost(results_dir):
    data = tool_calling.main(["--model", "dummy-tiny", "--limit", "4", "--max-tokens", "48",
                              "--throughput-limit", "4", "--repeats", "1"])
    rows = {(r["mode"], r["decoding"]): r for r in data["accuracy"]}
    assert set(rows) == {(m, d) for m in ("required", "named", "auto") for d, _, _ in tool_calling.DECODINGS}
    # a random model never writes a valid call on its own; under the grammar every call it
    # completes validates (the real model's rates are in test_structured_http)
    assert rows[("required", "unconstrained")]["schema_valid_rate"] == 0
    assert all(r["schema_valid_rate"] == r["call_rate"] for r in rows.values() if r["constrained"])
    # the forced text of a required call (its name and keys) goes in without a step a token
    one_by_one, jumping = rows[("named", "constrained, a token a step")], rows[("named", "constrained, jump-forward")]
    assert jumping["output_tokens"] > 0 and jumping["steps"] < one_by_one["steps"] - 10
    tp = data["throughput"]
    assert tp["median_none"] > 0 and tp["median_half"] > 0 and tp["ratio"] == tp["median_half"] / tp["median_none"]
    assert (results_dir / "tool_calling.md").exists() and (results_dir / "tool_calling.png").exists()


def test_tool_call_scoring_checks_the_schema_and_the_key_arguments():
    tools, tasks = tool_calling.load_tasks()
    assert len(tasks) >= 30 and len({t["function"] for t in tasks}) == len(tools) == 6
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    task = {"function": "add_numbers", "arguments": {"a": 17, "b": 25}}
    call = '<tool_call>\n{"name": "add_numbers", "arguments": {"a": 17.0, "b": 25}}\n</tool_call>'
    assert tool_calling.score(call, task, schemas) == (True, True, True)
    assert tool_calling.score(call.replace("25", "26"), task, schemas) == (True, True, False)
    assert tool_calling.score(call.replace('"b": 25', '"b": "x"'), task, schemas) == (True, False, False)
    assert tool_calling.score("no call", task, schemas) == (False, False, False)


@pytest.mark.parametrize("args, shows", [(["--help"], "tools"), (["tools", "--help"], "--throughput-limit"),
                                         (["agent", "-h"], "python -m benchmarks agent")])
def test_benchmarks_cli_help_exits_0_and_says_what_it_runs(args, shows):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "benchmarks", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert shows in r.stdout


def test_span_latency_scenario_reads_latency_per_concurrency_from_exported_spans(results_dir):
    from benchmarks import span_latency
    results = span_latency.run("dummy-tiny", [1, 3], rounds=1, max_tokens=8)
    assert [results[c]["requests"] for c in (1, 3)] == [1, 3]  # one span per request
    for r in results.values():
        assert 0 <= r["queue_p50"] <= r["ttft_p50"] <= r["e2e_p50"] <= r["e2e_p90"]
    span_latency.report("dummy-tiny", results, 8)
    assert (results_dir / "span_latency.png").stat().st_size > 0 and (results_dir / "span_latency.md").is_file()


def test_affinity_scenario_reports_hits_and_ttft_per_routing(results_dir):
    from benchmarks import affinity
    runs = [affinity.run_mode("dummy-tiny", a, sessions=2, turns=2, max_tokens=4) for a in (False, True)]
    assert [r["routing"] for r in runs] == ["round robin", "session affinity"]
    for r in runs:
        assert r["calls"] == 4 and 0 < r["hit_rate"] < 1 and r["prefill_tokens_computed"] > 0
        assert 0 < r["ttft_p50"] <= r["ttft_p90"]


def test_step_profile_splits_a_decode_step_into_its_parts(results_dir):
    from benchmarks import step_profile
    rows = step_profile.main(["--model", "dummy-tiny", "--batches", "1,4", "--tokens", "6"])
    assert [(r["path"], r["batch"]) for r in rows] == [("per-op", 1), ("fused", 1), ("per-op", 4), ("fused", 4)]
    for r in rows:
        assert r["steps"] == 6 and r["sample_and_bookkeeping"] >= 0
        assert 0 < r["prepare"] + r["layers"] + r["embed_and_final_norm"] + r["lm_head"] <= r["step_ms"]
        # per-op: the linears and attention are timed inside the layers; fused: one C++ call
        assert (0 < r["of_which_linears"] + r["of_which_attention"] < r["layers"]) == (r["path"] == "per-op")
    assert "linears:" in (results_dir / "step_profile.md").read_text()


def test_step_profile_times_a_prompt_chunk_after_cached_tokens(results_dir):
    from benchmarks import step_profile
    rows = step_profile.main(["--model", "dummy-tiny", "--batches", "1", "--tokens", "2", "--prefill-after", "0,64",
                              "--prefill-tokens", "20"])
    chunks = [r for r in rows if "cached" in r]
    assert [(c["cached"], c["new"]) for c in chunks] == [(0, 20), (64, 20)]
    for c in chunks:
        assert 0 < c["attention"] and 0 < c["linears"] and c["attention"] + c["linears"] < c["step_ms"]
    assert "| 64 | 20 |" in (results_dir / "prefill_profile.md").read_text()


def test_peers_scenario_reports_a_missing_peer_instead_of_failing(results_dir):
    from benchmarks import peers
    data = peers.main(["--limit", "3", "--single-tokens", "6", "--repeats", "1", "--skip-bf16",
                       "--llama-cpp-python", "/nonexistent/python", "--vllm-python", ""])
    engine, llama, vllm = data["systems"]
    assert engine["system"] == "engine (native GGUF)" and "q4_1" in engine["kernels"]
    assert engine["one_stream_tok_s"] > 0 and engine["mixed_output_tok_s"] > 0
    assert "not installed" in llama["missing"] and "not installed" in vllm["missing"]
    assert "vs llama.cpp" in (results_dir / "peers.md").read_text()


def test_agent_programs_scenario_reports_job_completion_times_off_and_on(results_dir):
    data = __import__("benchmarks.agent_programs", fromlist=["main"]).main(
        ["--model", "dummy-tiny", "--short", "2", "--long", "1", "--tool-s", "0.01", "--max-tokens", "4",
         "--num-kv-blocks", "64"])
    for key in ("off", "on"):
        run = data[key]
        assert 0 < run["short"]["mean_s"] <= run["short"]["p90_s"] and run["long"]["mean_s"] > 0
        assert 0 < run["cached_share"] < 1  # later calls re-send the conversation: the cache holds some
    assert (results_dir / "agent_programs.md").stat().st_size > 0


def test_a_benchmark_stopped_by_an_error_keeps_what_was_measured(results_dir, monkeypatch):
    """A peer that dies after our systems ran (or any other error) must not throw away the
    figures measured before it: they are written as interrupted, then the error goes on."""
    def peer_died(*args, **kwargs):
        raise RuntimeError("peer died")
    monkeypatch.setattr(throughput, "run_sequential", peer_died)
    with pytest.raises(RuntimeError, match="peer died"):
        throughput.main(["--model", "dummy-tiny", "--limit", "3", "--skip-transformers", "--skip-http",
                         "--fixed-requests", "2", "--single-tokens", "4"])
    saved = json.loads(next(results_dir.glob("throughput-*.json")).read_text())
    assert saved["interrupted"] is True and saved["runs"]["continuous"]["output_tokens"] > 0


def test_the_agents_benchmarks_vllm_server_logs_to_the_results_folder_from_any_directory(results_dir, tmp_path,
                                                                                        monkeypatch):
    """From a fresh clone (no results folder yet) or another working directory, a vLLM that
    does not start is reported with the path of its log, which holds its output."""
    import argparse
    from benchmarks.agent_latency import VllmServer
    from engine.loader import DEFAULT_MODEL
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    args = argparse.Namespace(model=DEFAULT_MODEL, num_kv_blocks=192, max_num_seqs=8, max_model_len=2048,
                              vllm_python="/bin/false")
    with pytest.raises(RuntimeError, match="did not start") as failed:
        VllmServer(args)
    assert str(results_dir / "vllm-server.log") in str(failed.value)
    assert (results_dir / "vllm-server.log").exists()


def test_the_agents_benchmark_reports_a_rates_repeats_by_their_medians():
    """--repeats: each figure is the median of the runs (counts the lower middle one, so a
    count stays a measured count), lists come from the first run, and every run's goodput
    is kept beside the median."""
    from benchmarks.agent_latency import median_point
    runs = [{"rate": 2.0, "goodput": g, "p95_s": p95, "preemptions": n, "hit_rate_after_tools": None,
             "kv_pins": {"taken": t}, "answers": [a]}
            for g, p95, n, t, a in [(1.5, 12.0, 3, 10, "x"), (0.5, 30.0, 1, 4, "y"), (1.0, 14.0, 2, 8, "z")]]
    point = median_point(runs)
    assert point == {"rate": 2.0, "goodput": 1.0, "p95_s": 14.0, "preemptions": 2, "hit_rate_after_tools": None,
                     "kv_pins": {"taken": 8}, "answers": ["x"], "goodput_runs": [1.5, 0.5, 1.0]}
    assert median_point(runs[:2])["preemptions"] == 1 and median_point(runs[:2])["goodput"] == 1.0
    with pytest.raises(AssertionError):
        median_point([runs[0], runs[1] | {"rate": 3.0}])


def test_re_rendering_an_agents_run_keeps_its_setting_and_plots_latency_and_goodput(results_dir, tmp_path):
    """--from-json: the title states the run's own setting (not this command's defaults),
    and both plots (p95 latency and goodput against rate) are drawn."""
    from benchmarks.agent_latency import Outcome, main as agents_main, point
    outcomes = [Outcome(2.0, calls=[(100, 0, 10), (130, 96, 10)]), Outcome(9.0, calls=[(100, 0, 10)])]
    measured = point(1.0, outcomes, [1.5, 2.0], 3.0)
    assert measured["attainment"] == 0.5 and measured["hit_rate_after_tools"] == 96 / 130
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({
        "setting": {"seed": 2, "programs": 2, "max_num_seqs": 4, "num_kv_blocks": 384, "slo_factor": 3.0},
        "rates": [1.0], "programs": [], "runs": {}, "unloaded_s": [1.5, 2.0],
        "systems": {"first come first served": [measured]}}))
    agents_main(["--from-json", str(saved)])
    title = (results_dir / "agents.md").read_text().splitlines()[0]
    assert "(2 programs a rate" in title and "batch 4, 384 KV blocks" in title
    assert (results_dir / "agents.png").stat().st_size > 0 and (results_dir / "agents_goodput.png").stat().st_size > 0


def _agents_run(tmp_path, name: str, unloaded: list[float], rates_p95: dict[str, list[tuple[float, float]]],
                **setting):
    """An agents run's JSON: per system, (rate, latency of both programs) points."""
    from benchmarks.agent_latency import Outcome, point
    def both(latency: float) -> list[Outcome]:
        return [Outcome(latency, calls=[(100, 0, 10)]), Outcome(latency, calls=[(100, 0, 10)])]
    runs = {system: [point(rate, both(lat), unloaded, 3.0) for rate, lat in pts] for system, pts in rates_p95.items()}
    saved = tmp_path / name
    saved.write_text(json.dumps({
        "setting": {"seed": 0, "programs": 2, "max_num_seqs": 8, "num_kv_blocks": 192, "slo_factor": 3.0} | setting,
        "rates": sorted({p["rate"] for pts in runs.values() for p in pts}), "repeats": 1, "programs": [],
        "runs": runs, "unloaded_s": unloaded, "systems": {}}))
    return saved


def test_agents_runs_of_more_rates_merge_into_one_table_with_the_tail_reading_of_the_slo(results_dir, tmp_path):
    """--from-json a,b: the runs of both files as one table, each rate's median taken over
    both; the SLO also read as a bound on the tail (p95 <= 3x the unloaded p95)."""
    from benchmarks.agent_latency import main as agents_main
    ours = "oldest program first + KV kept + swapped"
    first = _agents_run(tmp_path, "a.json", [1.0, 3.0], {"first come first served": [(1.0, 3.0), (2.0, 9.0)],
                                                          ours: [(1.0, 3.0), (2.0, 4.0)]})
    more = _agents_run(tmp_path, "b.json", [1.0, 3.0], {"first come first served": [(1.5, 5.5), (2.0, 7.0)],
                                                         ours: [(1.5, 3.0), (2.0, 6.0)]})
    data = agents_main(["--from-json", f"{first},{more}"])
    fcfs = data["systems"]["first come first served"]
    assert [p["rate"] for p in fcfs] == [1.0, 1.5, 2.0] and fcfs[2]["p95_s"] == 8.0  # the median of 9 and 7
    assert fcfs[2]["goodput_runs"] == [1.0, 1.0]  # the program of 3 s alone meets 3x at 9 s and 7 s
    text = (results_dir / "agents.md").read_text()
    # per program (each within 3x its own 1 or 3 s), first come first served meets the SLO up to 1/s ...
    assert "At 1 programs/s, the highest rate where first come first served meets" in text
    assert f"p95 of {ours} there: 3.00 s (1.00x lower)" in text
    # ... as a bound on the tail (p95 <= 3x 3 s), up to 2/s, where ours is 5 s (the median of 4 and 6)
    assert "first come first served 2/s, oldest program first + KV kept + swapped 2/s" in text
    assert f"p95 of {ours} there: 5.00 s (1.60x lower)" in text


def test_with_a_window_programs_keep_arriving_in_turn_for_its_length_at_every_rate():
    from benchmarks.agent_latency import arrivals_at, make_programs
    programs = make_programs(4, 0)
    assert arrivals_at(8.0, programs, None) == [0, 1, 2, 3]  # each once: a burst at a high rate
    assert arrivals_at(0.5, programs, 10.0) == [0, 1, 2, 3, 0]
    assert arrivals_at(3.0, programs, 10.0) == [k % 4 for k in range(30)]


def test_a_knee_step_bisects_where_first_come_first_served_leaves_the_tail_bound():
    from benchmarks.agent_latency import knee_rate

    def pts(*p95s_by_rate):
        return [{"rate": r, "p95_s": p95} for r, p95 in p95s_by_rate]
    assert knee_rate(pts((1.5, 8.3), (2.0, 18.2), (2.5, 28.1)), 18.05) == 1.75
    assert knee_rate(pts((1.5, 8.3), (1.75, 15.3), (2.0, 18.2)), 18.05) == 1.875  # the next step, narrower
    # first come first served back within the bound at a higher rate (noise): the step above the highest within
    assert knee_rate(pts((1.0, 5.0), (2.0, 19.0), (3.0, 17.0), (4.0, 30.0)), 18.0) == 3.5
    assert knee_rate(pts((1.0, 5.0), (2.0, 9.0)), 18.0) is None   # never leaves it: nothing to bisect
    assert knee_rate(pts((1.0, 19.0), (2.0, 25.0)), 18.0) is None  # never within it
    assert knee_rate([], 18.0) is None


def test_agents_refuses_a_negative_knee_steps(capsys):
    from benchmarks.agent_latency import main as agents_main
    with pytest.raises(SystemExit):
        agents_main(["--knee-steps", "-1"])
    assert "--knee-steps must be at least 0" in capsys.readouterr().err


def test_agents_runs_of_other_programs_or_unloaded_latencies_are_refused(tmp_path, capsys):
    from benchmarks.agent_latency import main as agents_main
    first = _agents_run(tmp_path, "a.json", [2.0, 2.0], {"first come first served": [(1.0, 5.0)]})
    other = _agents_run(tmp_path, "b.json", [2.0, 3.0], {"first come first served": [(2.0, 5.0)]})
    with pytest.raises(SystemExit):
        agents_main(["--from-json", f"{first},{other}"])
    assert "differ in unloaded_s" in capsys.readouterr().err
    smaller_cache = _agents_run(tmp_path, "c.json", [2.0, 2.0], {"first come first served": [(2.0, 5.0)]},
                                num_kv_blocks=96)
    with pytest.raises(SystemExit):
        agents_main(["--from-json", f"{first},{smaller_cache}"])
    assert "differ in setting" in capsys.readouterr().err
    steady = _agents_run(tmp_path, "d.json", [2.0, 2.0], {"first come first served": [(2.0, 5.0)]}, window=30.0)
    with pytest.raises(SystemExit):  # a steady load and a burst do not merge (older runs store no window)
        agents_main(["--from-json", f"{first},{steady}"])
    assert "differ in setting" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # refused before any engine starts: the saved run has no programs
        agents_main(["--unloaded-from", str(first), "--programs", "2"])
    assert "measured other programs" in capsys.readouterr().err
    from benchmarks.agent_latency import make_programs
    programs = json.loads(json.dumps([p.__dict__ for p in make_programs(2, 0)]))  # as a saved run holds them
    other_model = json.loads(first.read_text()) | {"programs": programs}
    other_model["setting"]["model"] = "gemma3-270m"
    first.write_text(json.dumps(other_model))
    with pytest.raises(SystemExit):
        agents_main(["--unloaded-from", str(first), "--programs", "2"])
    assert "measured another model (gemma3-270m)" in capsys.readouterr().err
