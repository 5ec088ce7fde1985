

# Block sizes the Triton kernels compile for on a GPU within its limits (triton_compile.py):
# at 32, fp32 prefill tiles at head dim 256 need 103 KB of shared memory (an L4 has 99 KB per
# block) and spill up to 296 bytes per thread; at 64 and 128, worse
GPU_BLOCK_SIZES = (16,)
