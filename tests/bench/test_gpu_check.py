"""benchmarks/gpu_check.sh: the step runner records a failing step and runs the next one, and
the whole check runs end to end on the CPU (`--cpu-dry-run`). Nothing here is timed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks import check_runner, gpu_check
from benchmarks.check_runner import Check, Skipped, StepFailed, needs, run_steps

from tests.bench.test_bench import QUICK_ROWS, check_quick_rows

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"


def python(c: Check, code: str) -> str:
    return c.command([sys.executable, "-c", code])


def test_a_failing_step_is_recorded_and_the_next_steps_still_run(tmp_path: Path, capsys):
    def fails(c: Check) -> dict:
        python(c, "import sys; print('first line'); print('the cause'); sys.exit(3)")
        return {"never": True}

    def hangs(c: Check) -> dict:
        python(c, "import time; time.sleep(60)")
        return {}

    def passes(c: Check) -> dict:
        return {"said": python(c, "print('hello')").strip()}

    def after_fails(c: Check) -> dict:
        needs(c, "fails")
        return {}

    def cannot(c: Check) -> dict:
        raise Skipped("no DRIVE here")

    steps = {"fails": fails, "hangs": hangs, "passes": passes, "after": after_fails}
    c = Check(None, tmp_path, tmp_path)
    report = run_steps(c, steps | {"cannot": cannot}, {"hangs": 1}, budget_s=120)
    got = report["steps"]
    assert list(got) == ["fails", "hangs", "passes", "after", "cannot"]
    assert got["fails"]["status"] == "fail" and "exit 3" in got["fails"]["reason"]
    assert "the cause" in got["fails"]["reason"] and got["fails"]["figures"] == {}
    assert got["hangs"]["status"] == "fail" and "timed out after 1 s" in got["hangs"]["reason"]
    assert got["passes"] == got["passes"] | {"status": "pass", "figures": {"said": "hello"}}
    assert got["after"]["status"] == "skip" and "needs step fails" in got["after"]["reason"]
    assert got["cannot"] == got["cannot"] | {"status": "skip", "reason": "no DRIVE here"}
    assert report["summary"] == {"pass": 1, "fail": 2, "skip": 2}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("FAIL step fails (") and "exit 3" in lines[0]
    assert lines[2].startswith("PASS step passes (")


def test_an_injected_failure_breaks_only_that_steps_commands(tmp_path: Path):
    def argv(c: Check) -> dict:
        return {"args": python(c, "import sys; print(sys.argv[1:])").strip()}

    c = Check(None, tmp_path, tmp_path, inject="broken")
    report = run_steps(c, {"fine": argv, "broken": argv}, {}, budget_s=60)
    assert report["steps"]["fine"]["figures"] == {"args": "[]"}
    assert report["steps"]["broken"]["figures"] == {"args": "['--no-such-option']"}


def test_a_spent_budget_skips_the_remaining_steps(tmp_path: Path):
    c = Check(None, tmp_path, tmp_path)
    report = run_steps(c, {"late": lambda c: {}}, {}, budget_s=1)
    assert report["steps"]["late"]["status"] == "skip"
    assert "budget" in report["steps"]["late"]["reason"]


def test_ddp_log_reads_backend_world_and_sync_batchnorm():
    output = (
        "[rank0]:[I reducer.cpp] ...\n[Rank 0]: DDP Initialized with: \nbroadcast_buffers: 1\n"
        "has_sync_bn: 1\nrank: 0\nworld_size: 1\nbackend_name: nccl\ndevice_ids: 0\n"
    )
    assert gpu_check.ddp_log(output) == {
        "has_sync_bn": "1",
        "world_size": "1",
        "backend_name": "nccl",
    }
    with pytest.raises(StepFailed, match="did not run under DDP"):
        gpu_check.ddp_log("run: runs/x\nbundle: runs/x/bundle\n")


def test_the_demo_cell_is_a_cell_of_demo_full():
    from fundusfm.demo import FULL_PRESET

    base = {s.removeprefix("grid.base.") for s in FULL_PRESET if s.startswith("grid.base.")}
    assert set(gpu_check.FULL_CELL) == {s for s in base if not s.startswith("train.epochs=")}
    assert sum(gpu_check.GPU.timeouts) < gpu_check.GPU.budget_s < 8 * 60
    assert len(gpu_check.GPU.timeouts) == len(gpu_check.DRY.timeouts) == len(gpu_check.STEPS)


def test_without_cuda_it_says_to_use_the_dry_run(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert capsys.readouterr().out.strip() == gpu_check.NO_CUDA


def dry_run(*args: str | Path) -> tuple[int, str]:
    done = subprocess.run(
        ["bash", str(SCRIPT), "--cpu-dry-run", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    return done.returncode, done.stdout + done.stderr


@pytest.mark.slow
def test_cpu_dry_run_passes_every_step_end_to_end(tmp_path: Path):
    out, work = tmp_path / "dry.json", tmp_path / "work"
    code, output = dry_run("--json", out, "--work", work)
    report = json.loads(out.read_text())
    steps = report["steps"]
    # `bench run --quick`'s rows a and c run here only (test_bench.py runs b and d)
    for group in ("a", "c"):
        rows = {r["id"]: r for r in json.loads((work / f"bench_{group}.json").read_text())["rows"]}
        check_quick_rows(rows, [r for r in QUICK_ROWS if r.startswith(group)])
    predict = rows["c.predict.64"]["values"]
    assert predict["same_decisions"] and predict["max_abs_diff_vs_eager"] <= 1e-4
    assert list(steps) == list(gpu_check.STEPS), output
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:  # Inductor needs a C++ compiler: row c's torch.compile fails, by name
        assert "torch.compile" in steps["bench_c"]["reason"]
        steps.pop("bench_c")
    for name, step in steps.items():
        assert step["status"] in ("pass", "skip"), (name, step["reason"])
        assert step["status"] == "pass" or step["reason"], name
        assert f"{step['status'].upper()} step {name} (" in output
    assert code == (0 if compiler else 1), output
    assert report["mode"] == "cpu-dry-run" and "pending" in report["note"]
    assert report["summary"]["fail"] == (0 if compiler else 1)
    figures = {name: step["figures"] for name, step in steps.items() if step["status"] == "pass"}
    assert figures["bench_a"]["a.cuda.128"]["status"] == "skipped"  # no CUDA here
    assert not compiler or figures["bench_c"]["c.64.eager"]["images_per_s"] > 0
    assert figures["demo_cell"]["train_images"] > 0
    assert 0 <= figures["segment"]["test"]["dice"] <= 1
    ddp = {"backend_name": "gloo", "world_size": "1", "has_sync_bn": "0"}
    assert figures["torchrun"]["ddp"] == ddp  # a one-process torchrun job runs under DDP
    assert figures["torchrun"]["max_abs_score_diff_vs_demo_cell"] <= 1e-5
    assert figures["ddp_gloo"]["max_abs_score_diff"] <= 1e-5


@pytest.mark.slow
def test_cpu_dry_run_reports_an_injected_failure_and_runs_on(tmp_path: Path):
    out = tmp_path / "dry.json"
    code, output = dry_run("--only", "bench_a,synth", "--inject-failure", "bench_a", "--json", out)
    steps = json.loads(out.read_text())["steps"]
    assert code == 1, output
    assert steps["bench_a"]["status"] == "fail" and "No such option" in steps["bench_a"]["reason"]
    assert steps["synth"]["status"] == "pass" and steps["synth"]["figures"]["images"] == 32
    assert "FAIL step bench_a" in output and "PASS step synth" in output


def test_check_runner_launches_fundusfm_and_torchrun(tmp_path: Path, monkeypatch):
    seen = []
    monkeypatch.setattr(check_runner, "execute", lambda cmd, env, t: (seen.append(cmd), (0, ""))[1])
    c = Check(None, tmp_path, tmp_path)
    c.run(["split", Path("m.csv")])
    c.run(["finetune", "-q"], torchrun=2)
    assert seen[0] == [sys.executable, "-m", "fundusfm", "split", "m.csv"]
    assert seen[1][1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert seen[1][6:] == ["-m", "fundusfm", "finetune", "-q"]
