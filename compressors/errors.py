"""Domain errors. The CLI maps them to exit codes: InputError -> 2, PassFailure -> 3.

Also the did-you-mean hint that input errors (recipe keys, pass and recipe names, data arrays,
``--shape`` names, search choices) append to the bad name they report.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ModelpressError(Exception):
    """Base of every error the tool raises on purpose."""


class InputError(ModelpressError):
    """Bad input or usage: a file, key, tensor or flag the user must fix (exit code 2)."""


class RecipeError(InputError):
    """One or more problems in a recipe, each already formatted as ``file:line: key: message``."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class PassFailure(ModelpressError):
    """A pass raised or produced a model that fails the checks (exit code 3)."""

    def __init__(self, pass_name: str, ran_before: list[str], reason: str):
        self.pass_name = pass_name
        self.ran_before = list(ran_before)
        self.reason = reason
        before = ", ".join(ran_before) if ran_before else "nothing"
        super().__init__(f"pass {pass_name} failed after [{before}]: {reason}")


def did_you_mean(word: str, choices: Iterable[str], *, ignore_case: bool = False) -> str:
    """`` (did you mean 'x'?)`` naming the closest of ``choices`` (difflib), else ``""``.

    ``ignore_case``: compare lowercased, for names users spell freely (model inputs, where
    ``Input`` for ``input`` is the usual slip); recipe keys and pass names are compared as written.
    """
    by_key = {(choice.lower() if ignore_case else choice): choice for choice in choices}
    guess = difflib.get_close_matches(word.lower() if ignore_case else word, list(by_key), n=1)
    return f" (did you mean {by_key[guess[0]]!r}?)" if guess else ""
