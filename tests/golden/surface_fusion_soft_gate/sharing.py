"""Seam 1, the execution plan: which parameter block each depth step runs.

A stack of N steps backed by M <= N parameter blocks (0-based step i):

    none       block i                                   (M = N, the vanilla Transformer)
    recurrent  block 0                                   (M = 1; Dabre & Fujita, AAAI 2019)
    sequence   floor(i / ceil(N / M))                    (Takase & Kiyono 2021, arXiv 2104.06022)
    cycle      i mod M
    cycle_rev  i mod M for i < M * (ceil(N / M) - 1); the remaining steps run M-1, M-2, ...

Only the plan changes with sharing: the stack holds M blocks and loops over the N steps. Key/value
cache slots and ``layer_idx`` follow the *step*, never the block, so two steps that share weights
never share a cache slot.

``cycle_rev`` follows the paper's definition (Sec. 2): with N = 6, M = 4 it runs 0 1 2 3 3 2. When M
divides N it is the CYCLE order followed by the blocks reversed (6 steps, 3 blocks: 0 1 2 2 1 0).
The authors' code builds the plan differently when M does not divide N and N >= 2M (N = 7, M = 3:
their code runs 0 1 2 0 2 1 0, the paper's rule 0 1 2 0 1 2 2); the paper's rule is implemented.
Folders saved before this rule was adopted (it used to reverse the last M steps: N = 6, M = 4 ran
0 1 3 2 1 0) keep their own code and plan when loaded with ``trust_remote_code``.

``EXECUTION_PLANS`` is the seam's table (config key ``sharing_strategy`` -> plan function); the
config's allowed values are its keys. A plan function maps (N, M) to the block of every step and
may refuse an (N, M) it cannot schedule; :func:`execution_plan` adds the checks every plan shares.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

ExecutionPlan = Callable[[int, int], tuple[int, ...]]


def _plan_none(num_steps: int, num_blocks: int) -> tuple[int, ...]:
    if num_blocks != num_steps:
        raise ValueError(f"must equal the depth {num_steps} without sharing")
    return tuple(range(num_steps))


def _plan_recurrent(num_steps: int, num_blocks: int) -> tuple[int, ...]:
    if num_blocks != 1:
        raise ValueError("must be 1 for recurrent stacking")
    return (0,) * num_steps


def _plan_sequence(num_steps: int, num_blocks: int) -> tuple[int, ...]:
    run_length = math.ceil(num_steps / num_blocks)
    return tuple(step_idx // run_length for step_idx in range(num_steps))


def _plan_cycle(num_steps: int, num_blocks: int) -> tuple[int, ...]:
    return tuple(step_idx % num_blocks for step_idx in range(num_steps))


def _plan_cycle_rev(num_steps: int, num_blocks: int) -> tuple[int, ...]:
    # Takase & Kiyono, Sec. 2: CYCLE for the first M * (ceil(N / M) - 1) steps, then the remaining
    # steps run the blocks in reverse order, starting from the last block.
    cycled = num_blocks * (math.ceil(num_steps / num_blocks) - 1)
    head = [step_idx % num_blocks for step_idx in range(cycled)]
    return tuple(head + [num_blocks - 1 - rest for rest in range(num_steps - cycled)])


# The seam's table: ``sharing_strategy`` -> plan function (N steps, M blocks) -> block per step.
EXECUTION_PLANS: dict[str, ExecutionPlan] = {
    "none": _plan_none,
    "recurrent": _plan_recurrent,
    "sequence": _plan_sequence,
    "cycle": _plan_cycle,
    "cycle_rev": _plan_cycle_rev,
}


@functools.lru_cache(maxsize=None)
def execution_plan(strategy: str, num_steps: int, num_blocks: int, field: str = "unique_layers") -> tuple[int, ...]:
    """Return the block index run at each step (a pure function, computed once per arguments).

    Args:
        strategy: A key of :data:`EXECUTION_PLANS`.
        num_steps: Depth N of the stack.
        num_blocks: Number M of parameter blocks.
        field: Config field named in error messages.

    Returns:
        A tuple of length ``num_steps`` with values in ``range(num_blocks)``.

    Raises:
        ValueError: if the strategy is unknown, the plan refuses (N, M), or the plan would leave a
            block unused (for example ``sequence`` with N=6, M=4 only ever reaches blocks 0..2),
            which would silently train fewer parameters than the config promises.
    """
    if strategy not in EXECUTION_PLANS:
        raise ValueError(
            f"sharing_strategy = {strategy!r} is not supported; allowed values: {', '.join(map(repr, EXECUTION_PLANS))}."
        )
    if not 1 <= num_blocks <= num_steps:
        raise ValueError(f"{field} = {num_blocks} must be between 1 and the depth {num_steps}.")
    try:
        plan = EXECUTION_PLANS[strategy](num_steps, num_blocks)
    except ValueError as error:
        raise ValueError(f"{field} = {num_blocks} {error} (sharing_strategy = {strategy!r}).") from None
    unused = sorted(set(range(num_blocks)) - set(plan))
    if unused:
        raise ValueError(
            f"sharing_strategy = {strategy!r} with depth {num_steps} and {field} = {num_blocks} never runs "
            f"block(s) {unused}; choose {field} so that the schedule uses every block "
            f"(for 'sequence', a divisor of {num_steps})."
        )
    return plan
