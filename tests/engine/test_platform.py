"""engine/platform.py: the one place that looks at the hardware. The ISA level and its cap
(ENGINE_CPU_ISA), the activation dtype per machine, what stats() says runs where, and the
import graph (adk_backend -> engine -> engine_kernels; models reach kernels only through
the platform). A machine of another kind is simulated by its /proc/cpuinfo flags."""
import ast
from pathlib import Path

import pytest
import torch

from engine import EngineConfig, LLM
from engine import platform
from engine.platform import current_platform, machine_isa, requested_isa, supported_isas

ROOT = Path(__file__).resolve().parents[2]
ZEN3 = frozenset("fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2 popcnt".split())
ZEN4 = ZEN3 | frozenset("avx512f avx512bw avx512vl avx512dq avx512cd avx512_vnni avx512_bf16".split())
ICE_LAKE = ZEN4 - {"avx512_bf16"}


@pytest.fixture
def cpu(monkeypatch):
    """Makes the engine see a CPU with the given flags."""
    def with_flags(flags: frozenset[str]) -> None:
        monkeypatch.setattr(platform, "cpu_flags", lambda: flags)
    yield with_flags


def test_each_kind_of_cpu_gets_its_level_and_dtype(cpu, monkeypatch):
    monkeypatch.delenv("ENGINE_CPU_ISA", raising=False)
    for flags, level, dtype in ((ZEN4, "avx512", torch.bfloat16), (ICE_LAKE, "avx512", torch.float32),
                                (ZEN3, "avx2", torch.float32), (frozenset({"sse2"}), "generic", torch.float32),
                                (frozenset({"neon", "asimd"}), "generic", torch.float32)):
        cpu(flags)
        assert machine_isa() == level and requested_isa() == level
        p = platform.Platform("cpu", level)
        assert p.default_dtype() == dtype, (level, flags)


def test_bf16_on_a_cpu_that_cannot_compute_it_is_refused_at_config_time_saying_why(cpu, monkeypatch):
    cpu(ZEN3)
    monkeypatch.delenv("ENGINE_CPU_ISA", raising=False)
    with pytest.raises(ValueError, match="dtype 'bfloat16' needs a CPU that computes bf16.*avx2 level.*dtype='auto'"):
        EngineConfig(model="dummy-tiny", dtype="bfloat16", device="cpu")
    assert EngineConfig(model="dummy-tiny", device="cpu").dtype == "float32"  # auto
    with pytest.raises(ValueError, match="float16"):
        EngineConfig(model="dummy-tiny", dtype="float16", device="cpu")


def test_a_cap_above_the_machine_or_unknown_is_a_clear_error(cpu, monkeypatch):
    cpu(ZEN3)
    monkeypatch.setenv("ENGINE_CPU_ISA", "avx512")
    with pytest.raises(ValueError, match=r"ENGINE_CPU_ISA=avx512: this CPU .* lacks avx512_vnni, avx512bw.*runs avx2, generic"):
        requested_isa()
    with pytest.raises(ValueError, match="ENGINE_CPU_ISA=avx512"):
        EngineConfig(model="dummy-tiny", device="cpu")
    monkeypatch.setenv("ENGINE_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="expected auto, avx512, avx2, generic"):
        requested_isa()


def test_a_cap_makes_the_machine_look_like_a_lower_one(cpu, monkeypatch):
    cpu(ZEN4)
    monkeypatch.setenv("ENGINE_CPU_ISA", "avx2")
    assert supported_isas() == ["avx2", "generic"]
    p = current_platform("cpu")
    assert p.isa == "avx2" and not p.features and p.default_dtype() == torch.float32
    with pytest.raises(ValueError, match="bfloat16"):  # as on a Zen 3
        EngineConfig(model="dummy-tiny", dtype="bfloat16", device="cpu")


@pytest.mark.parametrize("level", ["avx2", "generic"])
def test_stats_name_the_level_and_the_kernel_behind_each_op(level, monkeypatch):
    if level not in supported_isas():
        pytest.skip(f"this CPU lacks the {level} level")
    monkeypatch.setenv("ENGINE_CPU_ISA", level)
    llm = LLM("dummy-tiny", num_kv_blocks=32, max_model_len=128, quantization="int8")
    info = llm.engine.stats()["platform"]
    quant = {"avx2": "avx2_maddubs", "generic": "generic"}[level]
    assert info["isa"] == level and info["dtype"] == "float32" and info["device"] == "cpu"
    assert info["kernels"] == {"linear": quant, "norms": f"{level}_cpp", "rope_kv_write": f"{level}_cpp",
                               "activation": f"{level}_cpp", "decode_attention": f"{level}_vec16",
                               "prefill_attention": "torch_sdpa", "decode_layer": "fused_cpp",
                               "sampling_argmax": f"{level}_cpp", "grammar_bitmask": f"{level}_cpp"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_imports_point_one_way_and_models_reach_kernels_only_through_the_platform():
    for path in (ROOT / "engine_kernels").rglob("*.py"):
        assert not {m for m in _imports(path) if m.split(".")[0] in ("engine", "adk_backend")}, path
    for path in (ROOT / "engine").rglob("*.py"):
        assert not {m for m in _imports(path) if m.split(".")[0] == "adk_backend"}, path
        hardware = {m for m in _imports(path) if m == "engine_kernels.cpu"}
        assert not hardware or path.name == "platform.py", f"{path} loads kernels itself: ask engine/platform.py"
    for path in (ROOT / "engine" / "models").glob("*.py"):
        assert "cpuinfo" not in path.read_text() and "cpu_kernels" not in path.read_text(), path
