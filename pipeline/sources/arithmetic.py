"""Seeded synthetic arithmetic: question/answer text, with a held-out set that never trains.

Every problem (a, op, b) is assigned to training or held-out by a hash of its text, so the split
does not depend on the seed, the number of documents or the order of generation: no held-out
problem can appear in any training document, whatever the recipe.
"""

from __future__ import annotations

import hashlib
import random

from pipeline.core.config import ArithmeticOptions


def answer(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def question(a: int, op: str, b: int) -> str:
    return f"What is {a} {op} {b}?"


def is_heldout(a: int, op: str, b: int, per_mille: int) -> bool:
    h = hashlib.sha256(f"{a}{op}{b}".encode()).digest()
    return int.from_bytes(h[:4], "big") % 1000 < per_mille


def format_problem(a: int, op: str, b: int) -> str:
    return f"Q: {question(a, op, b)}\nA: {answer(a, op, b)}\n"


def _problems(opts: ArithmeticOptions, rng: random.Random, heldout: bool):
    while True:
        a, b = rng.randint(0, opts.max_operand), rng.randint(0, opts.max_operand)
        op = rng.choice(opts.ops)
        if is_heldout(a, op, b, opts.heldout_per_mille) == heldout:
            yield a, op, b


def training_documents(opts: ArithmeticOptions, seed: int = 0) -> list[str]:
    rng = random.Random(f"arithmetic-train-{seed}")
    gen = _problems(opts, rng, heldout=False)
    return ["".join(format_problem(*next(gen)) for _ in range(opts.problems_per_doc)) for _ in range(opts.docs)]


def heldout_problems(opts: ArithmeticOptions, n: int, seed: int = 0) -> list[tuple[int, str, int]]:
    """`n` distinct held-out problems (fewer if the held-out universe is smaller)."""
    universe = [(a, op, b) for op in opts.ops for a in range(opts.max_operand + 1)
                for b in range(opts.max_operand + 1) if is_heldout(a, op, b, opts.heldout_per_mille)]
    rng = random.Random(f"arithmetic-heldout-{seed}")
    rng.shuffle(universe)
    return universe[:n]
