"""Domain errors. The CLI maps them to exit codes: InputError -> 2, PassFailure -> 3."""

from __future__ import annotations


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
