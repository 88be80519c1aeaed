"""The one error type a user can cause.

Anything a user can get wrong (a missing folder, an unknown method, a malformed override, an unsafe
checkpoint) raises `UserError` with one line naming the thing and the fix. The CLI turns it into
that line on stderr and exit code 2; everything else is a bug and keeps its traceback.
"""

import re


class UserError(Exception):
    """A mistake in the user's input; the message says what was wrong and how to fix it."""

    exit_code = 2


class JobCannotGoOn(Exception):
    """A run crashed in one process of a multi-process job: the others wait in a collective that will never
    complete, so the job ends (exit 1, one line; torchrun stops the other processes) after recording it."""

    exit_code = 1


def user_line(err: UserError) -> str:
    """The one line of a `UserError`, also when a data-loader worker raised it.

    torch re-raises a worker's exception in the main process with the worker's whole traceback as
    its message ("Caught UserError in DataLoader worker process 0. Original Traceback ... UserError:
    <line>"); the user's line is the traceback's last.
    """
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    _, found, line = last.partition(f"{UserError.__name__}: ")
    return line if found else last


def not_a_pickle(err: BaseException) -> bool:
    """Whether torch's weights-only loader stopped at bytes no pickle holds (an HTML error page saved as .pth,
    random bytes, another format): an unknown opcode or a bad magic number, not a pickled object it refused."""
    return bool(re.search(r"Unsupported operand|invalid load key|magic number", str(err)))


def refused_pickle(err: BaseException) -> str:
    """What torch's weights-only loader refused, in a few words for a one-line error: the pickled global it met
    ("a pickled mymodule.Trainer"), else its message's first sentence (torch's whole text runs to a paragraph,
    with terminal colour codes)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"a pickled {found.group(1)}"
    return (text.split(". ")[0] if text else type(err).__name__)[:120]
