"""Turn-taking between benchmark processes that must not run at the same time (`python -m bench compare`).

Each process runs an interleaved benchmark. At each of its trainer's progress events it hands the turn back
and waits for the next one, so the processes run their windows alternately and never together: only one of
them computes at a time, and the machine's drift falls on both commits alike. The orchestrator
(`bench.compare.lockstep`) holds the other end of two pipes, whose descriptors it passes in `BENCH_TURN_FDS`
("read,write").

Lines on the pipes: the process writes `wait` (my turn is over, give me another) and the orchestrator answers
`go`. After its last window the process asks once more, so that its final sample image and export also run in
a turn of their own; then it exits, and its pipe's end of file says it is done.
"""

from __future__ import annotations

import os

ENV = "BENCH_TURN_FDS"


class Turns:
    def __init__(self, read_fd: int, write_fd: int):
        self.reader = os.fdopen(read_fd, "r", buffering=1)
        self.writer = os.fdopen(write_fd, "w", buffering=1)

    @classmethod
    def from_environment(cls) -> Turns | None:
        value = os.environ.get(ENV)
        if not value:
            return None
        read_fd, write_fd = (int(part) for part in value.split(","))
        return cls(read_fd, write_fd)

    def wait(self) -> None:
        """Hand the turn back (or, the first time, say this process is ready) and block until it comes again."""
        self.writer.write("wait\n")
        answer = self.reader.readline().strip()
        if answer != "go":  # the orchestrator is gone: nothing would be comparable any more
            raise RuntimeError(f"the comparison's orchestrator answered {answer!r} instead of 'go'")
