"""Packed low-bit weight storage and the kernels that compute with it (issue 7).

Every method in qbench produces uniform integer codes with per-group scales and zeros, so speed
depends on the format, not on the method. ``packing`` turns any ``LayerQState`` into one kernel
view, ``w = scale * q + offset`` per (row, group) over densely packed unsigned codes (int zero
points, decoupleQ's float offsets, act-order column permutations and sparse outlier channels
all map onto it); ``cpu`` computes ``x @ w.T`` from that storage with torch's own packed ops
where they exist, a compiled C++ kernel for every bit width, or an exact pure-torch fallback;
``PackedLinear`` is the module a model runs with. ``gpu`` computes the same product on CUDA
(torch's tinygemm int4 op, and a Triton kernel for 2/3/4/8 bits in ``triton_qgemm``) and
``gpu_bench`` times it with CUDA events; both import on machines without a GPU.
"""
