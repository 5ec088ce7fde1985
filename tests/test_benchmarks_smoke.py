"""Fast smoke runs of the benchmark suite on the tiny model: the reports carry their fields,
and the comparisons point the right way (in work done, not wall time: timings are for the
benchmarks themselves)."""
from benchmarks import agent_prefix, latency
from benchmarks.report import markdown_table
from benchmarks.systems import run_engine
from benchmarks.workloads import agent_sessions, load_workload, poisson_arrivals, synthetic
from engine import LLM

TINY = dict(dtype="float32", num_kv_blocks=512, max_model_len=1024)


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
    assert s.extra["steps"] > 1.2 * c.extra["steps"]
    d = c.as_dict()
    assert {"system", "output_tokens", "seconds", "output_tokens_per_s", "extra"} <= set(d)


def test_latency_report_fields():
    res = latency.run("dummy-tiny", [50.0], 6, 4, **TINY)
    for policy in ("continuous", "static"):
        r = res[policy][0]
        assert {"rate", "ttft_p50", "ttft_p99", "e2e_p50", "e2e_p99", "output_tokens_per_s"} <= set(r)
        assert 0 <= r["ttft_p50"] <= r["ttft_p99"] <= r["e2e_p99"]


def test_agent_workload_prefix_caching_computes_fewer_prefill_tokens():
    off = agent_prefix.run("dummy-tiny", 3, 3, 8, False, **TINY)
    on = agent_prefix.run("dummy-tiny", 3, 3, 8, True, **TINY)
    assert on["prompt_tokens_sent"] > 0 and off["prefill_tokens_computed"] == off["prompt_tokens_sent"]
    assert on["prefill_tokens_computed"] < 0.6 * off["prefill_tokens_computed"]


def test_workload_generators_are_reproducible():
    assert synthetic(5, seed=3) == synthetic(5, seed=3) != synthetic(5, seed=4)
    arrivals = poisson_arrivals(200, rate=10.0, seed=1)
    assert arrivals == sorted(arrivals) and 10 < arrivals[-1] < 30
    assert len(agent_sessions(4, 3)) == 4 and len(agent_sessions(4, 3)[0]) == 3
    assert "| a |" in markdown_table(["a"], [[1.0]])
