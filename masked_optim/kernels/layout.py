"""Column indices of the launcher's tables, shared by the host code that fills them and the kernels.

Tensor table (int64 ``[tensors, TENSOR_FIELDS]``, one row per tensor of the param group): data
addresses (0 where a tensor is absent), the element count, the tensor's first block within its
bucket's block table, and its unit (row of the histogram, -1 when the tensor is not gated).
Hyper table (float64 ``[HYPER_FIELDS]``): the group's hyper-parameters as Python doubles, so the
kernels round them to the math dtype exactly as the reference's tensor-scalar arithmetic does.
"""
from __future__ import annotations

# tensor table columns
PARAM = 0
GRAD = 1
EXP_AVG = 2
EXP_AVG_SQ = 3
IMPORTANCE = 4
ANCHOR = 5
ANCHOR_PARAM = 6
USER_MASK = 7
STEP = 8
IMPORTANCE_STEP = 9
THRESHOLD = 10
NUMEL = 11
FIRST_BLOCK = 12
UNIT = 13
TENSOR_FIELDS = 14

# hyper table entries
LR = 0
BETA1 = 1
BETA2 = 2
ONE_MINUS_BETA1 = 3
ONE_MINUS_BETA2 = 4
EPS = 5
WEIGHT_DECAY = 6
IMPORTANCE_BETA = 7
ONE_MINUS_IMPORTANCE_BETA = 8
PROTECT_STRENGTH = 9
ANCHOR_DECAY = 10
IMPORTANCE_KIND = 11  # 0 fisher, 1 taylor, 2 magnitude
PROTECT = 12  # 1.0 for mask="protect"
MAXIMIZE = 13
SKIP_NONFINITE = 14
SELECT_DELTA = 15  # reference.DELTA: select's score is s_hat / (a + delta)
HYPER_FIELDS = 16

IMPORTANCE_KINDS = {"fisher": 0, "taylor": 1, "magnitude": 2}

# fresh per-step counts (int64 [COUNT_FIELDS]), in GroupStats order
ELEMENTS = 0
UPDATED = 1
FROZEN = 2
SKIPPED = 3
COUNT_FIELDS = 4
