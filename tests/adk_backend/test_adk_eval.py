"""`adk eval` with an engine judge: ADK's own evaluator runs the tools agent's eval set
(agents/tools/tools.test.json) under the criteria `adk eval` reads beside it
(test_config.json): the tool trajectory, and final_response_match_v2 judged by
engine/smollm2-135m-instruct, whose verdict a JSON schema in judge_model_config keeps
readable."""
import asyncio
import csv

from google.adk.evaluation.agent_evaluator import AgentEvaluator


def test_adk_eval_runs_the_tools_agent_with_an_engine_model_as_judge(tmp_path):
    out = tmp_path / "results.csv"
    try:
        asyncio.run(AgentEvaluator.evaluate("agents.tools", "agents/tools/tools.test.json", num_runs=1,
                                            output_file=str(out), print_detailed_results=False))
    except AssertionError:
        pass  # a criterion below its threshold: what each metric scored is in the results, checked below
    scores = {row["metric_name"]: row["score"] for row in csv.DictReader(out.open())}
    assert float(scores["tool_trajectory_avg_score"]) == 1.0  # add_numbers(a=17, b=25), exactly
    # the 135M judge's verdict (valid or invalid) was read: a reply outside the schema scores nothing
    assert scores["final_response_match_v2"] in ("0.0", "1.0")
    assert float(scores["inference_call_count_v1"]) == 2  # the call, then the answer from its result
