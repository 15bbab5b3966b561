"""Seam 1, the execution plan: which parameter block each depth step runs.

A stack of N steps backed by M <= N parameter blocks (0-based step i):

    none       block i                                   (M = N, the vanilla Transformer)
    recurrent  block 0                                   (M = 1; Dabre & Fujita, AAAI 2019)
    sequence   floor(i / ceil(N / M))                    (Takase & Kiyono 2021, arXiv 2104.06022)
    cycle      i mod M
    cycle_rev  i mod M for i < N - M; the last M steps run blocks M-1, ..., 0

Only the plan changes with sharing: the stack holds M blocks and loops over the N steps. Key/value
cache slots and ``layer_idx`` follow the *step*, never the block, so two steps that share weights
never share a cache slot.
"""

from __future__ import annotations

import math


def execution_plan(strategy: str, num_steps: int, num_blocks: int, field: str = "unique_layers") -> tuple[int, ...]:
    """Return the block index run at each step.

    Args:
        strategy: One of ``none``, ``recurrent``, ``sequence``, ``cycle``, ``cycle_rev``.
        num_steps: Depth N of the stack.
        num_blocks: Number M of parameter blocks.
        field: Config field named in error messages.

    Returns:
        A tuple of length ``num_steps`` with values in ``range(num_blocks)``.

    Raises:
        ValueError: if the strategy is unknown, or the plan would leave a block unused (for
            example ``sequence`` with N=6, M=4 only ever reaches blocks 0..2), which would
            silently train fewer parameters than the config promises.
    """
    if not 1 <= num_blocks <= num_steps:
        raise ValueError(f"{field} = {num_blocks} must be between 1 and the depth {num_steps}.")
    if strategy == "none":
        if num_blocks != num_steps:
            raise ValueError(f"{field} = {num_blocks} must equal the depth {num_steps} without sharing.")
        plan = tuple(range(num_steps))
    elif strategy == "recurrent":
        if num_blocks != 1:
            raise ValueError(f"{field} = {num_blocks} must be 1 for recurrent stacking.")
        plan = (0,) * num_steps
    elif strategy == "sequence":
        run_length = math.ceil(num_steps / num_blocks)
        plan = tuple(step_idx // run_length for step_idx in range(num_steps))
    elif strategy == "cycle":
        plan = tuple(step_idx % num_blocks for step_idx in range(num_steps))
    elif strategy == "cycle_rev":
        head = [step_idx % num_blocks for step_idx in range(num_steps - num_blocks)]
        plan = tuple(head + list(range(num_blocks - 1, -1, -1)))
    else:
        raise ValueError(
            f"sharing_strategy = {strategy!r} is not supported; allowed values: "
            "'none', 'recurrent', 'sequence', 'cycle', 'cycle_rev'."
        )
    unused = sorted(set(range(num_blocks)) - set(plan))
    if unused:
        raise ValueError(
            f"sharing_strategy = {strategy!r} with depth {num_steps} and {field} = {num_blocks} never runs "
            f"block(s) {unused}; choose {field} so that the schedule uses every block "
            f"(for 'sequence', a divisor of {num_steps})."
        )
    return plan
