"""Errors that mean "the user asked for something impossible".

The command line turns every ``UserError`` into one line on stderr and exit code 2, with no traceback;
anything else is a bug and keeps its traceback.
"""

import os


class UserError(Exception):
    """Bad input: an unknown name, an impossible ipc, missing or corrupt data files, a malformed file."""


class UnknownNameError(UserError, KeyError):
    """A name that is not in a registry; the message suggests the nearest valid name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DataFilesMissing(UserError):
    """A dataset's files are absent or unreadable; the message lists what is expected where."""

    def __init__(self, dataset: str, root: object, expected: list[str], detail: str = "", about_root: bool = False):
        self.dataset, self.root, self.expected = dataset, root, expected
        where = str(root) if os.path.isabs(str(root)) else f"{root} (= {os.path.abspath(str(root))})"
        what = f"{detail}: {where}" if about_root else f"{detail or 'files missing'} under {where}"
        super().__init__(
            f"dataset '{dataset}': {what}; expected there: {', '.join(expected)} "
            f"(set --data-root or DDBENCH_DATA to the folder that holds them)"
        )


class Diverged(Exception):
    """A distillation produced NaN/inf losses or images, or an unusable learned learning rate."""
