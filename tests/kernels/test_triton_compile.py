"""The Triton kernels compiled for real GPU targets (L4: sm_89, H100: sm_90) on this machine,
without a GPU: what the interpreter the other Triton tests run under cannot show. The
heaviest configuration of each kernel the engine may launch (attention: every head dim,
whose decode KV tiles differ, the largest group, bf16 and fp32; the rest at head dim 256, the
layer's element-wise ops in bf16 too: their rounding differs) compiles within the target's
shared memory per block and without spills.
`python -m benchmarks gpu-compile` prints every configuration."""
import json
import os
import subprocess
import sys

import pytest
import torch

from engine.attention_backends import TRITON_BLOCK_SIZES, check_backend

OPS = ("rms_norm", "rope_write_kv", "act_and_mul")  # engine_kernels/triton_ops.py
_SCRIPT = f"OPS = {OPS!r}\n" + """
import json
from engine_kernels import triton_compile as tc
configs = [c for c in tc.kernel_configs(dtypes=("bf16", "fp32"), groups=(8,)) if c.kernel == "paged_attention"]
configs += [c for c in tc.kernel_configs(head_dims=(256,), dtypes=("fp32",)) if c.kernel != "paged_attention"]
configs += [c for c in tc.kernel_configs(head_dims=(256,), dtypes=("bf16",)) if c.kernel in OPS]
old = tc._attention(256, "fp32", 16, 4, "prefill")  # the 64-row tile it used before, at D=256
old = tc.KernelConfig(old.kernel, "prefill, 64 rows", old.dtype, old.signature,
                      tuple((k, 64 if k == "ROWS" else 16 if k == "TOKENS_PER_TILE" else v) for k, v in old.constexprs))
done, failures = tc.compile_all(configs)
old_problems = tc.problems(tc.compile_one(old, "sm_89"))
print(json.dumps({"compiled": [[r.config.name, r.target, r.shared_bytes, r.registers, r.spill_bytes] for r in done],
                  "failures": failures, "old_problems": old_problems}))
"""


def test_every_kernel_compiles_for_l4_and_h100_within_their_limits():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=500)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["failures"] == []
    kernels = {name.split("[")[0] for name, *_ in report["compiled"]}
    assert kernels == {"paged_attention", "merge_splits", "write_kv", "copy_blocks", *OPS}
    assert {target for _, target, *_ in report["compiled"]} == {"sm_89", "sm_90"}
    # the check can fail: the tile the prefill kernel used before needed more than an L4 has
    assert any("shared memory" in p and "sm_89" in p for p in report["old_problems"]), report["old_problems"]


@pytest.mark.parametrize("block_size", [8, 32, 64])
def test_a_block_size_the_triton_kernels_do_not_compile_well_for_is_refused_on_cuda(block_size):
    assert block_size not in TRITON_BLOCK_SIZES
    with pytest.raises(ValueError, match=f"block_size {block_size} with the 'triton' attention backend"):
        check_backend("triton", "cuda", torch.bfloat16, "auto", block_size)
    check_backend("triton", "cuda", torch.bfloat16, "auto", 16)
    check_backend("triton", "cpu", torch.float32, "auto", block_size)  # the interpreter: any block size
