"""The key-value arithmetic task of the CALM paper (Table 1), generated from a seed (pure).

N keys (random lowercase strings of 2-6 characters) map to a random permutation of 1..N.
Three datasets of (prompt, completion) pairs, all character-level:

  NUM-MATH  "210+543="  -> "7530"      arithmetic over numbers (the anchor's skill)
  KV-SUBS   "ab+cde="   -> "210+543"   the keys' values written in (the specialist's skill)
  KV-MATH   "ab+cde="   -> "7530"      arithmetic over keys (needs both)

Every number is written little-endian at a fixed width: least significant digit first, padded
with zeros to the width of N (operands) or one more digit (answers), so 12 + 345 = 357 reads
"210+543=7530". A digit's place is then always at the same offset and carries flow in reading
order, which small transformers learn far faster; exact match parses the numbers back.
The keys are split into held-in keys (the bridge's training data uses only these) and held-out
keys (evaluation only).
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

ALPHABET = string.ascii_lowercase + string.digits + "+-=\n"


@dataclass(frozen=True)
class KeyValueTask:
    keys: tuple[str, ...]
    values: tuple[int, ...]  # values[i] belongs to keys[i]
    held_in: frozenset[str]  # keys the bridge may train on
    operators: str = "+"
    operands: tuple[int, ...] = (2,)  # how many operands an expression may have

    @property
    def mapping(self) -> dict[str, int]:
        return dict(zip(self.keys, self.values, strict=True))

    @property
    def width(self) -> int:
        """Digits of the largest value: every operand is written at this width."""
        return len(str(len(self.keys)))

    def operand(self, value: int) -> str:
        return str(value).zfill(self.width)[::-1]

    def answer(self, value: int) -> str:
        """Sign first, then width + 1 digits little-endian: 357 -> '7530', -40 -> '-0400'."""
        return ("-" if value < 0 else "") + str(abs(value)).zfill(self.width + 1)[::-1]

    @property
    def held_out(self) -> tuple[str, ...]:
        return tuple(k for k in self.keys if k not in self.held_in)


def make_task(
    *,
    seed: int,
    num_keys: int,
    held_in_fraction: float = 0.2,
    operators: str = "+",
    operands: tuple[int, ...] = (2,),
) -> KeyValueTask:
    """Keys, a value permutation and the held-in split, all from ``seed``."""
    rng = random.Random(seed)
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < num_keys:
        key = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 6)))
        if key not in seen:
            seen.add(key)
            keys.append(key)
    values = list(range(1, num_keys + 1))
    rng.shuffle(values)
    held_in = frozenset(rng.sample(keys, round(held_in_fraction * num_keys)))
    return KeyValueTask(tuple(keys), tuple(values), held_in, operators, tuple(operands))


def read_number(text: str) -> int | None:
    text = text.strip()
    sign = -1 if text.startswith("-") else 1
    digits = text.lstrip("-")
    if not digits.isdigit():
        return None
    return sign * int(digits[::-1])


def evaluate(operands: list[int], operators: list[str]) -> int:
    total = operands[0]
    for op, value in zip(operators, operands[1:], strict=True):
        total = total + value if op == "+" else total - value
    return total


def _expression(rng: random.Random, task: KeyValueTask, pool: list[str]):
    n = rng.choice(task.operands)
    keys = [rng.choice(pool) for _ in range(n)]
    ops = [rng.choice(task.operators) for _ in range(n - 1)]
    return keys, ops


def _join(items: list[str], ops: list[str]) -> str:
    out = items[0]
    for op, item in zip(ops, items[1:], strict=True):
        out += op + item
    return out


def num_math(rng: random.Random, task: KeyValueTask, count: int) -> list[dict[str, str]]:
    """Arithmetic over numbers drawn from the value range (the anchor's training data)."""
    rows = []
    top = len(task.keys)
    for _ in range(count):
        n = rng.choice(task.operands)
        numbers = [rng.randint(1, top) for _ in range(n)]
        ops = [rng.choice(task.operators) for _ in range(n - 1)]
        prompt = _join([task.operand(x) for x in numbers], ops) + "="
        rows.append({"prompt": prompt, "completion": task.answer(evaluate(numbers, ops))})
    return rows


def num_math_in_context(rng: random.Random, task: KeyValueTask, count: int) -> list[dict[str, str]]:
    """NUM-MATH after an unrelated context: "qz+fyk=" + "210+543=" -> "7530".

    The context is an expression over random lowercase strings (not the task's keys, and with no
    values attached), so the anchor learns to do arithmetic wherever a numeric expression sits in
    its context, as a general language model does, and still learns nothing about the keys.
    """
    rows = []
    for row in num_math(rng, task, count):
        ops = [c for c in row["prompt"] if c in "+-"]
        words = [
            "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 6)))
            for _ in range(len(ops) + 1)
        ]
        rows.append(
            {"prompt": _join(words, ops) + "=" + row["prompt"], "completion": row["completion"]}
        )
    return rows


def completion(task: KeyValueTask, keys: list[str], ops: list[str], mode: str) -> str:
    """What an expression over keys is answered with: subs, math or worked (see below)."""
    values = [task.mapping[k] for k in keys]
    substituted = _join([task.operand(v) for v in values], ops)
    answer = task.answer(evaluate(values, ops))
    return {"subs": substituted, "math": answer, "worked": f"{substituted}={answer}"}[mode]


def answer_prompt(task: KeyValueTask, prompt: str, mode: str) -> dict[str, str]:
    """A row for an existing keyed prompt such as "ab+cde=", answered in ``mode``."""
    expression = prompt.removesuffix("=")
    ops = [c for c in expression if c in task.operators]
    keys = re.split("[" + re.escape(task.operators) + "]", expression)
    return {"prompt": prompt, "completion": completion(task, keys, ops, mode)}


def _keyed_rows(
    rng: random.Random, task: KeyValueTask, count: int, pool: list[str], *, mode: str
) -> list[dict[str, str]]:
    rows = []
    for _ in range(count):
        keys, ops = _expression(rng, task, pool)
        rows.append(
            {"prompt": _join(keys, ops) + "=", "completion": completion(task, keys, ops, mode)}
        )
    return rows


def kv_subs(
    rng: random.Random, task: KeyValueTask, count: int, pool: list[str]
) -> list[dict[str, str]]:
    """Expressions over keys from ``pool`` -> the same expressions with the values written in."""
    return _keyed_rows(rng, task, count, pool, mode="subs")


def kv_math(
    rng: random.Random, task: KeyValueTask, count: int, pool: list[str]
) -> list[dict[str, str]]:
    """Expressions over keys from ``pool`` -> their value."""
    return _keyed_rows(rng, task, count, pool, mode="math")


def kv_worked(
    rng: random.Random, task: KeyValueTask, count: int, pool: list[str]
) -> list[dict[str, str]]:
    """KV-MATH with the substitution written out first: "ab+cde=" -> "210+543=7530".

    Our addition to the paper's two formats: the bridge only has to write the values in (what
    transfers to unseen keys); the anchor then does the arithmetic it knows on visible numbers.
    """
    return _keyed_rows(rng, task, count, pool, mode="worked")


def key_lines(task: KeyValueTask) -> list[dict[str, str]]:
    """'key=value' rows: the plain map, which helps the specialist memorise it."""
    return [{"prompt": f"{k}=", "completion": task.operand(v)} for k, v in task.mapping.items()]
