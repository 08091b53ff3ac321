"""The testbed's error types. CLIs turn these into one line and an exit code."""


class TestbedError(Exception):
    """Base of every error the testbed raises on purpose."""

    exit_code = 1


class ConfigError(TestbedError):
    """A scenario (or other input file) is invalid. Carries every problem found."""

    exit_code = 2

    def __init__(self, path, problems):
        self.path = str(path)
        self.problems = list(problems)
        lines = [f"{self.path}: {p}" for p in self.problems]
        if len(lines) == 1:   # one problem, one line
            super().__init__(lines[0])
        else:
            super().__init__(f"{len(self.problems)} problem(s) in {self.path}:\n  " + "\n  ".join(lines))


class ProtocolError(TestbedError):
    """A protocol role broke its own contract (unexpected message, bad shapes, ...)."""

    exit_code = 3


class BudgetExceeded(TestbedError):
    """A party's peak accelerator memory went over its budget."""

    exit_code = 4

    def __init__(self, party, budget, peak, detail=""):
        self.party, self.budget, self.peak = party, budget, peak
        msg = (f"{party}: peak accelerator memory {fmt_bytes(peak)} exceeds its budget "
               f"{fmt_bytes(budget)}")
        super().__init__(msg + (f" ({detail})" if detail else ""))


class TransportError(TestbedError):
    """A frame or message could not be sent, received, or was rejected."""

    exit_code = 5


def fmt_bytes(n):
    """Human-readable byte count with binary units: 1536 -> '1.50 KiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
