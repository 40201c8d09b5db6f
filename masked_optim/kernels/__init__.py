"""The fused Triton backend of MaskedAdamW (``backend="triton"``).

``launch.step_group`` takes one param group's step in one memory pass (see ``step_kernel`` for
the memory layout and grid). Importing this package imports Triton but touches no device.
"""
