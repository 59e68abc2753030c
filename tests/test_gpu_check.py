"""benchmarks/gpu_check.py, the one-call device script: its dry run on the CPU writes every figure with the numbers
the device run will report, its time caps kill a step and keep its partial JSON, and the wheel resolver carries
exactly what the device lacks."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
FIGURES = ("1_full_kl", "2_hidden_kl", "3_dpo_nll", "4_ptx", "5_grpo_full")


@pytest.fixture
def bench(monkeypatch):
    """The benchmark scripts as modules (they import each other from benchmarks/)."""
    monkeypatch.syspath_prepend(BENCH)
    import gpu_check
    import gpu_wheels

    return gpu_check, gpu_wheels


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_out")
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "CUDA_VISIBLE_DEVICES")}
    done = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_check.py"), "--dry-run", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    reports = {name: json.loads((out / f"{name}.json").read_text()) for name in FIGURES}
    return out, done.stdout, reports


def finite_numbers(value, where=""):
    """Every number inside ``value`` (dicts, lists), with its path; fails on NaN or inf."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        assert math.isfinite(value), f"{where} = {value}"
        return [(where, value)]
    items = value.items() if isinstance(value, dict) else enumerate(value)
    return [pair for key, item in items for pair in finite_numbers(item, f"{where}/{key}")]


def assert_interval(spread: dict):
    low, high = spread["ci95"]
    assert low <= spread["median"] <= high
    assert min(spread["values"]) <= low and high <= max(spread["values"])


@pytest.mark.slow
def test_dry_run_output_fits_what_a_device_call_returns(dry_run):
    out, stdout, _ = dry_run
    names = sorted(os.listdir(out))
    assert names == sorted([f"{n}.json" for n in FIGURES] + ["summary.json", "gpu_check.log"])
    assert len(names) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", n) and os.path.isfile(out / n) for n in names)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert summary["steps"]["install"] == {"status": "skipped"}
    assert all(summary["steps"][name]["status"] == "ok" for name in ("verify", *FIGURES)), summary["steps"]
    assert summary["elapsed_s"] < summary["budget_s"]
    assert "the Triton kernel call is skipped" in stdout
    assert stdout.rstrip().splitlines()[-1].startswith("| GRPO full KL in the reward")  # the table comes last


@pytest.mark.slow
def test_dry_run_figures_hold_finite_numbers_and_only_cuda_memory_is_missing(dry_run):
    out, _, reports = dry_run
    for name, report in reports.items():
        assert report["device"] and report["date"], name
        finite_numbers(report, name)
    summary = json.loads((out / "summary.json").read_text())
    for row in summary["headlines"]:
        if row["value"] is None:  # memory is read from CUDA's allocator, absent on the CPU
            assert "memory" in row["label"] and row["verdict"] == "not measured", row
        else:
            assert math.isfinite(row["value"]) and row["verdict"] != "not measured", row


@pytest.mark.slow
def test_dry_run_kernel_figure_is_exact_and_against_its_floor(dry_run):
    report = dry_run[2]["1_full_kl"]
    assert report["backend"] == "torch" and "Triton" in report["note"]
    assert report["floor_fwd_bwd_ms"] == pytest.approx(2.5 * report["floor_fwd_ms"])  # 5 tensor passes vs 2
    assert report["floor_fwd_ms"] == pytest.approx(2 * report["rows"] * report["vocab"] * 2 / (report["copy_TBps"] * 1e12) * 1e3)
    for case in ("dense", "masked"):
        assert report[case]["fwd_over_floor"] == pytest.approx(report[case]["fwd"]["ms"] / report["floor_fwd_ms"])
        assert report[case]["fwd"]["ci95"][0] <= report[case]["fwd"]["ms"] <= report[case]["fwd"]["ci95"][1]
    for direction in ("reverse", "forward"):
        exact, masked = report["accuracy"][direction], report["accuracy_masked"][direction]
        assert exact["max_abs_vs_fp64"] < 1e-5 and exact["kl_mean"] > 0.05
        assert exact["grad_max_abs_vs_naive_fp32"] <= exact["grad_bf16_rounding_bound"]
        assert masked["max_abs_vs_fp64_kept_columns"] < 1e-5
        assert masked["grad_max_abs_vs_fp64_kept_columns"] <= masked["grad_bf16_rounding_bound"]
        assert masked["grad_max_abs_at_masked_columns"] == 0.0


@pytest.mark.slow
def test_dry_run_hidden_figure_agrees_with_the_materialized_logits(dry_run):
    report = dry_run[2]["2_hidden_kl"]
    flops = 8 * report["rows"] * report["hidden_size"] * report["vocab"]
    assert report["lm_head_TFLOP"] * 1e12 == pytest.approx(flops)
    assert report["floor_ms"] == pytest.approx(flops / (report["matmul_TFLOPs"] * 1e12) * 1e3)
    default = report["from_hidden (default chunk)"]
    assert default["over_floor"] == pytest.approx(default["fwd_bwd_ms"] / report["floor_ms"])
    assert default["over_floor_ci95"][0] <= default["over_floor"] <= default["over_floor_ci95"][1]
    assert report["kl_max_abs_diff"] < 1e-5 and report["grad_hidden_max_abs_diff"] < 1e-5 and report["grad_weight_rel_diff"] < 1e-4


@pytest.mark.slow
def test_dry_run_trainer_figures_compare_the_right_sides(dry_run):
    reports = dry_run[2]
    for name, specs in (("3_dpo_nll", ["dpo_nll"]), ("4_ptx", ["dpo_ptx"]), ("5_grpo_full", ["grpo_full", "grpo_full_reward"])):
        report = reports[name]
        assert sorted(report["results"]) == sorted(specs)
        assert list(report["rounds_done"].values()) == [report["rounds"]]  # nothing cut: the dry run has time
        for spec in specs:
            result = report["results"][spec]
            assert_interval(result["time_ratio_per_round"])
            assert len(result["time_ratio_per_round"]["values"]) == report["rounds"]
            assert result["stock"]["steps"] == result["ours"]["steps"] == report["rounds"] * (report["steps"] - report["warmup"])
    nll = reports["3_dpo_nll"]["results"]["dpo_nll"]
    assert nll["stock"]["first_losses"][0] == pytest.approx(math.log(2), abs=1e-6)  # stock DPO starts at log 2
    assert nll["ours"]["first_losses"][0] > nll["stock"]["first_losses"][0] + 0.1  # + 0.2 * the chosen NLL
    ptx = reports["4_ptx"]
    alone = ptx["ptx_alone"]
    assert alone["chunked"]["nll"] == pytest.approx(alone["logits"]["nll"], rel=1e-5)  # the two paths, one NLL
    result = ptx["results"]["dpo_ptx"]
    assert result["ptx_cost_ratio"] == pytest.approx((result["ours"]["median_s"] - result["stock"]["median_s"]) / alone["logits"]["median_s"])
    assert_interval(result["ptx_cost_ratio_per_round"])
    grpo = reports["5_grpo_full"]["results"]
    assert grpo["grpo_full"]["stock"] == grpo["grpo_full_reward"]["stock"]  # one shared stock side


def write_script(path, body: str) -> str:
    path.write_text("import json, subprocess, sys, time\nargs = sys.argv[1:]\nout = args[args.index('--json') + 1]\n" + body)
    return str(path)


def test_a_step_past_its_cap_is_killed_with_its_children_and_its_partial_json_kept(bench, tmp_path):
    gpu_check, _ = bench
    slow = write_script(tmp_path / "slow.py", (
        "json.dump({'first_part': 1.5}, open(out, 'w'))\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "open(out + '.pid', 'w').write(str(child.pid))\n"
        "time.sleep(60)\n"))
    fast = write_script(tmp_path / "fast.py", "json.dump({'value': 1.0}, open(out, 'w'))\n")
    steps = [gpu_check.Step("1_slow", "sleeps past its cap", 3, slow, figure=True, headlines=[gpu_check.Headline("part", ("first_part",), None)]),
             gpu_check.Step("2_fast", "ends at once", 20, fast, figure=True, headlines=[gpu_check.Headline("value", ("value",), 2.0)])]
    out = tmp_path / "out"
    out.mkdir()
    start = time.monotonic()
    summary = gpu_check.Driver(steps, str(out), budget_s=23, dry_run=True).run()
    assert time.monotonic() - start < 3 + gpu_check.KILL_GRACE_S + 10
    assert summary["steps"]["1_slow"]["status"] == "killed at its cap"
    assert summary["steps"]["2_fast"]["status"] == "ok"
    assert json.loads((out / "1_slow.json").read_text()) == {"first_part": 1.5}
    assert [(row["figure"], row["verdict"]) for row in summary["headlines"]] == [("1_slow", ""), ("2_fast", "met")]
    grandchild = int((out / "1_slow.json.pid").read_text())
    time.sleep(0.5)
    try:
        with open(f"/proc/{grandchild}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        assert state in ("Z", "X"), f"the step's child {grandchild} still runs (state {state})"
    except FileNotFoundError:
        pass  # gone


def test_caps_pass_unused_time_forward_and_never_take_a_later_steps_plan(bench, tmp_path):
    gpu_check, _ = bench
    steps = [gpu_check.Step(f"{i}_step", "", plan, "x.py") for i, plan in enumerate((10, 20, 30), 1)]
    driver = gpu_check.Driver(steps, str(tmp_path), budget_s=60, dry_run=True)
    assert driver.cap(0) == pytest.approx(10, abs=0.5)
    driver.start -= 4  # the first step took 4 of its 10 s
    assert driver.cap(1) == pytest.approx(26, abs=0.5)
    driver.start -= 40  # the second ran long: the third keeps its 30 s only if there is that much left
    assert driver.cap(2) == pytest.approx(16, abs=0.5)


def test_only_reruns_named_figures_after_install_and_verify_within_their_plans(bench):
    gpu_check = bench[0]
    assert sum(step.plan_s for step in gpu_check.STEPS) == 480  # the 8 minutes, the install included
    steps = gpu_check.select(gpu_check.STEPS, "5_grpo_full,3_dpo_nll")
    assert [step.name for step in steps] == ["install", "verify", "3_dpo_nll", "5_grpo_full"]
    with pytest.raises(ValueError, match=r"\['verify'\], not figures"):
        gpu_check.select(gpu_check.STEPS, "3_dpo_nll,verify")


def test_verdicts_read_the_whole_interval(bench):
    verdict = bench[0].verdict
    assert verdict(1.0, [0.98, 1.01], 1.02) == "met"
    assert verdict(1.05, [1.03, 1.07], 1.02) == "missed"
    assert verdict(1.01, [0.99, 1.04], 1.02) == "median met, interval straddles"
    assert verdict(1.03, [1.00, 1.04], 1.02) == "median missed, interval straddles"
    assert verdict(0.4, None, 0.5) == "met" and verdict(None, None, 0.5) == "not measured" and verdict(3.0, None, None) == ""


def fake_wheel(folder, name: str, version: str, requires: list[str]) -> str:
    path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name}-{version}.dist-info/METADATA", metadata + "\nA description line: Requires-Dist: not-a-requirement\n")
    return path


def test_resolver_carries_exactly_what_the_device_lacks(bench, tmp_path):
    gpu_wheels = bench[1]
    index = {
        "trl": fake_wheel(tmp_path, "trl", "1.16.0", ["datasets>=4.7", "torch>=2.0", "pandas", "vllm; extra == 'vllm'",
                                                      "tomli; python_version < '3.11'"]),
        "datasets": fake_wheel(tmp_path, "datasets", "5.2.0", ["dill<0.4.2,>=0.3.0", "fsspec<=2026.9.0", "multiprocess<0.70.20",
                                                               "numpy>=1.17"]),
        "dill": fake_wheel(tmp_path, "dill", "0.4.1", []),
        "multiprocess": fake_wheel(tmp_path, "multiprocess", "0.70.19", ["dill>=0.4.1"]),
        "numpy": fake_wheel(tmp_path, "numpy", "2.4.0", []),
    }
    fetched = []

    def fetch(requirement):
        fetched.append(str(requirement))
        return index[requirement.name]

    from packaging.version import Version

    device = {"torch": Version("2.11.0"), "pandas": None, "fsspec": None, "numpy": Version("1.16.0")}
    chosen, unverified = gpu_wheels.resolve(["trl==1.16.0", "datasets==5.2.0"], device, fetch)
    assert sorted(chosen) == ["datasets", "dill", "multiprocess", "numpy", "trl"]  # numpy: the device's is too old
    assert "torch" not in chosen and not any("vllm" in f or "tomli" in f for f in fetched)
    assert unverified == {"pandas": ["any"], "fsspec": ["<=2026.9.0"]}
    index["dill"] = fake_wheel(tmp_path, "dill", "0.3.9", [])  # multiprocess then asks for a dill that is not carried
    with pytest.raises(ValueError, match="two versions"):
        gpu_wheels.resolve(["trl==1.16.0", "datasets==5.2.0"], device, fetch)


def test_device_package_list_and_size_limit(bench, tmp_path):
    gpu_wheels = bench[1]
    device = gpu_wheels.read_device_packages()
    assert str(device["torch"]) == "2.11.0" and str(device["transformers"]) == "5.17.0"
    assert "trl" not in device and "datasets" not in device and device["pyarrow"] is None
    wheel = tmp_path / "big.whl"
    wheel.write_bytes(b"x" * 2**20)
    assert gpu_wheels.check_size(3 * 2**20, [str(wheel)], limit=4 * 2**20) == 4 * 2**20
    with pytest.raises(ValueError, match="exceeds the 4 MiB"):
        gpu_wheels.check_size(3 * 2**20 + 1, [str(wheel)], limit=4 * 2**20)


def test_verify_flags_a_carried_wheel_that_is_not_the_one_installed(bench, tmp_path, capsys):
    from importlib import metadata

    gpu_wheels = bench[1]
    installed = metadata.version("pytest")
    fake_wheel(tmp_path, "pytest", installed, [f"pluggy=={metadata.version('pluggy')}"])
    assert gpu_wheels.verify(str(tmp_path)) == 0
    os.remove(os.path.join(tmp_path, f"pytest-{installed}-py3-none-any.whl"))
    fake_wheel(tmp_path, "pytest", "0.0.1", [])
    assert gpu_wheels.verify(str(tmp_path)) == 1
    assert "MISMATCH pytest==0.0.1" in capsys.readouterr().out
