"""Triton kernels for the paged KV cache, with plain torch references.

Modules: write_kv (KV scatter), decode_attention (split-K decode), prefill_attention (varlen
prefill over a paged prefix), reference (torch ground truth), launch_checks (launcher argument
checks), tiles (shared device functions); the CUDA microbenchmark is pdserve/bench/triton_decode.py.

Nothing is imported here: Triton decides when a kernel is defined whether it is compiled or
interpreted (TRITON_INTERPRET=1), so importing a kernel module is left to its user.
"""
