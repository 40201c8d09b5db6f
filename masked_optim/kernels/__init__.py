"""The fused Triton backend of MaskedAdamW (``backend="triton"``).

``launch.step_group`` takes one param group's step in one memory pass (see ``step_kernel`` for
the memory layout and grid), after a reading pre-pass only where a unit's threshold is not
known yet, and a one-program finish kernel. Importing this package imports Triton but touches no device.
"""
