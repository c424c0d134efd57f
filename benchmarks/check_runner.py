"""The step runner of benchmarks/gpu_check.py: command-line steps, each with a timeout, whose
failures are recorded (PASS / FAIL / SKIP and a reason) while the next step still runs."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]


class StepFailed(Exception):
    """A step's command failed or its output did not hold what the step checks."""


class Skipped(Exception):
    """A step that cannot run here (its reason is the message)."""


@dataclass
class Check:
    """What the steps share: the mode (sizes, timeouts), the work folder, the results so far."""

    mode: Any  # gpu_check.Mode
    work: Path
    drive: Path
    inject: str | None = None  # a step whose commands get a wrong option (the script's test)
    threads: str | None = None  # OMP_NUM_THREADS of every command (unset: the machine's)
    deadline: float = float("inf")
    step: str = ""
    timeout: float = 60.0
    commands: list[list[str]] = field(default_factory=list)
    done: dict[str, dict] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        threads = {"OMP_NUM_THREADS": self.threads} if self.threads else {}
        return {**os.environ, **threads, **extra}

    def run(self, args: list, env: dict | None = None, torchrun: int = 0) -> str:
        """`python -m fundusfm ARGS` (under torchrun with that many processes): its output."""
        launcher = [*TORCHRUN, str(torchrun)] if torchrun else []
        return self.command([sys.executable, *launcher, "-m", "fundusfm", *map(str, args)], env)

    def command(self, command: list[str], env: dict | None = None) -> str:
        """Run `command` within the step's time; StepFailed on a timeout or a failure."""
        if self.inject == self.step:
            command = [*command, "--no-such-option"]
        self.commands.append(command)
        left = max(1.0, min(self.timeout, self.deadline - time.monotonic()))
        code, output = execute(command, env or self.env(), left)
        shown = described(command)
        if code is None:
            raise StepFailed(f"timed out after {left:.0f} s: {shown}")
        if code:
            tail = " | ".join(output.strip().splitlines()[-3:])
            raise StepFailed(f"exit {code} from {shown}: {tail}")
        return output


def described(command: list[str]) -> str:
    """`fundusfm segment train` (`torchrun fundusfm finetune`): the command's words up to
    its first option, for a reason line."""
    words = command[command.index("fundusfm") :] if "fundusfm" in command else command[:2]
    head = list(itertools.takewhile(lambda w: not w.startswith("-"), words))
    return ("torchrun " if "torch.distributed.run" in command else "") + " ".join(head)


def execute(command: list[str], env: dict, timeout: float) -> tuple[int | None, str]:
    """Exit status (None: timed out, then stopped) and stdout + stderr of `command`."""
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun passes SIGTERM on to its workers
        try:
            output, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        return None, output


def needs(c: Check, step: str) -> None:
    """Skip the running step unless `step` passed before it."""
    if c.done.get(step, {}).get("status") != "pass":
        raise Skipped(f"needs step {step}, which did not pass")


def run_step(c: Check, name: str, fn: Callable[[Check], dict], timeout: float) -> dict:
    """One step: pass with its figures, skip with a reason, or fail with a reason."""
    c.step, c.commands, c.timeout = name, [], timeout
    start = time.monotonic()
    result = {"status": "pass", "seconds": 0.0, "timeout_s": timeout, "figures": {}, "reason": ""}
    try:
        if c.deadline - start < 5:
            raise Skipped("the check's time budget is spent")
        result["figures"] = fn(c)
    except Skipped as exc:
        result.update(status="skip", reason=str(exc))
    except Exception as exc:  # a failing step is a finding; the next step still runs
        result.update(status="fail", reason=f"{type(exc).__name__}: {exc}"[:600])
    result["seconds"] = round(time.monotonic() - start, 1)
    result["commands"] = [" ".join(cmd[1:]) for cmd in c.commands]
    line = f"{result['status'].upper()} step {name} ({result['seconds']:.0f} s)"
    print(line + (f": {result['reason']}" if result["reason"] else ""), flush=True)
    c.done[name] = result
    return result


def run_steps(
    c: Check, steps: dict[str, Callable[[Check], dict]], timeouts: dict, budget_s: float
) -> dict:
    """Every step in order within `budget_s`; the results and their counts."""
    start = time.monotonic()
    c.deadline = start + budget_s
    for name, fn in steps.items():
        run_step(c, name, fn, timeouts.get(name, 60))
    counts = {s: sum(r["status"] == s for r in c.done.values()) for s in ("pass", "fail", "skip")}
    return {"seconds": round(time.monotonic() - start, 1), "summary": counts, "steps": c.done}
