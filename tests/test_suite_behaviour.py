"""The linearity suite itself: it can fail, shares measurements under xdist, skips clearly."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import run_suite_here, write_project_settings

pytestmark = [pytest.mark.cpu, pytest.mark.slow]


def test_suite_fails_far_outside_the_window(tmp_path, tiny_checkpoint):
    report = tmp_path / "report.json"
    result = run_suite_here(
        tmp_path / "suite",
        "-m",
        "cpu",
        "--learning-rates",
        "1e-2,1e-1,1",
        "--num-repeats",
        "2",
        "--eval-size",
        "32",
        f"--entropy-json={report}",
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    outcomes = {
        "::".join(t["nodeid"].split("::")[-2:]): t["outcome"]
        for t in json.loads(report.read_text())["tests"]
    }
    # Both fixtures: directions that agree, and directions 50 % apart.
    for suite in ("TestLinearityCPU", "TestLinearityCPUSpread"):
        assert outcomes[f"{suite}::test_linear_window_covers_grid"] == "failed"
        assert outcomes[f"{suite}::test_nonlinearity_within_tolerance"] == "failed"
        assert outcomes[f"{suite}::test_entropy_change[eta=1.0]"] == "failed"
    result.stdout.fnmatch_lines(
        ["*LINEARITY ANALYSIS*", "*DETAILED RESULTS*", "*verdict NONLINEAR*", "*beyond*"]
    )


JUNIT_PROPERTIES = (
    "learning_rate",
    "mean_entropy_change",
    "stderr_entropy_change",
    "n_samples",
    "slope",
    "r_squared",
    "lack_of_fit_p",
    "verdict",
    "r_squared_per_repeat_min",
    "mixed_slope",
    "status",
)


def test_gpu_suite_runs_on_cpu_each_eta_measured_once(tmp_path, tiny_checkpoint):
    """With --device cpu the gpu bodies run: each η is measured once, the JUnit XML carries
    the analysis, and pytest writes the analysis `entropy-lab sweep` writes for the same
    checkpoint and settings. One process: sharing the η points between two xdist workers is
    shown on a run folder (test_track, `-n 2`, each (checkpoint, η) once across workers).
    The suite runs in this process (`run_suite_here`), as does the CLI sweep."""
    xml = tmp_path / "junit.xml"
    common = ["--dtype", "fp64", "--learning-rates", "1e-7,1e-6,1e-5", "--num-repeats", "2"]
    common += ["--eval-size", "32"]
    ran = run_suite_here(
        tmp_path / "suite",
        *("-m", "gpu", "--device", "cpu", f"--checkpoint={tiny_checkpoint}"),
        f"--basetemp={tmp_path / 'bt'}",
        f"--junitxml={xml}",
        *common,
    )
    ran.assert_outcomes(passed=7)  # 3 η + 4 aggregate tests
    logs = list((tmp_path / "bt").glob("entropy_store/*/measure_log.jsonl"))
    assert len(logs) == 1
    logged = [json.loads(line) for line in logs[0].read_text().splitlines()]
    assert sorted(e["eta"] for e in logged) == [1e-7, 1e-6, 1e-5]  # each η once
    text = xml.read_text()
    for name in JUNIT_PROPERTIES:
        assert f'name="{name}"' in text, name
    # `entropy-lab sweep --checkpoint X` with the same settings writes the same analysis
    from entropy_lab.cli import main

    (from_pytest,) = [
        json.loads(p.read_text()) for p in (tmp_path / "bt").glob("entropy_store/*/analysis.json")
    ]
    out = tmp_path / "cli"
    argv = ["sweep", f"--checkpoint={tiny_checkpoint}", *common, "--output-dir", str(out)]
    assert main([*argv, "--no-progress", "--threads", "1"]) == 0
    (folder,) = out.glob("entropy_lr_experiment_*")
    from_cli = json.loads((folder / "analysis.json").read_text())
    assert from_pytest["config"] == from_cli["config"]
    assert from_pytest["summary"] == from_cli["summary"]


def test_gpu_suite_skips_with_reason_and_a_spaced_checkpoint_is_refused(tmp_path, tiny_checkpoint):
    """Skips with a reason a person can act on. `--checkpoint DIR` would make pytest take DIR
    for a test path and drop pytest.ini: refused with the fix; `--checkpoint=DIR` is the run
    that skips."""
    import torch

    suite = tmp_path / "suite"
    spaced = run_suite_here(suite, "-m", "gpu", "--checkpoint", str(tiny_checkpoint), "--co")
    assert spaced.ret == pytest.ExitCode.USAGE_ERROR
    spaced.stderr.fnmatch_lines([f"*write --checkpoint={tiny_checkpoint} (with '=')*"])
    no_ckpt = run_suite_here(suite, "-m", "gpu", "-rs")
    no_ckpt.stdout.fnmatch_lines(["*gpu suite needs --checkpoint DIR*"])
    if torch.cuda.is_available():  # the suite would run for real: collecting it is enough
        joined = run_suite_here(suite, "-m", "gpu", f"--checkpoint={tiny_checkpoint}", "--co")
        assert joined.ret == pytest.ExitCode.OK
        pytest.skip("this machine has CUDA: the skip path cannot be shown here")
    joined = run_suite_here(suite, "-m", "gpu", "-rs", f"--checkpoint={tiny_checkpoint}")
    assert joined.ret == pytest.ExitCode.OK
    joined.assert_outcomes(skipped=9)  # 5 η + 4 aggregate tests
    joined.stdout.fnmatch_lines(["*gpu suite needs CUDA; add --device cpu*"])


def test_a_child_process_under_pytester_finds_this_sessions_tiny_checkpoint(
    tiny_checkpoint, pytester
):
    """pytester points HOME at its own folder: a child pytest or CLI started from a test would
    look for the tiny checkpoint under it and build another (~33 s of CPU) unless it inherits
    ENTROPY_LAB_CACHE (tests/conftest.py); seen failing with that pin removed."""
    code = "from entropy_lab.tiny import default_cache_dir; print(default_cache_dir())"
    child = pytester.run(sys.executable, "-c", code)
    assert child.ret == 0, child.errlines
    assert child.outlines == [str(tiny_checkpoint.parent)]


def test_another_projects_tests_are_left_alone(pytester, monkeypatch):
    """The plugin is installed into other people's environments (pytest11): a test or a
    parametrized fixture of theirs named ``eta`` is theirs, not a learning-rate grid; and
    their xdist workers keep the GPUs they were given (the plugin pins gwK to one GPU only
    for its own gpu suite, i.e. with --checkpoint)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    pytester.makeconftest(
        "import pytest\n"
        "@pytest.fixture(params=[1, 2])\n"
        "def eta(request):\n"
        "    return request.param\n"
    )
    pytester.makepyfile(
        test_theirs="def test_uses_eta(eta):\n    assert eta in (1, 2)\n",
        test_own_fixture=(
            "import pytest\n"
            "@pytest.fixture\n"
            "def eta():\n"
            "    return 0.5\n"
            "def test_other(eta):\n"
            "    assert eta == 0.5\n"
        ),
        test_gpus=(
            "import os\n"
            "def test_all_gpus_visible():\n"
            "    assert os.environ['CUDA_VISIBLE_DEVICES'] == '0,1'\n"
        ),
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=4)


def test_an_xdist_group_runs_on_one_worker(pytester):
    """The project's pytest.ini and root conftest under `-n 2`: the tests of one xdist_group
    share a worker (module fixtures of the grouped modules are built once, the torchrun tests
    run one at a time)."""
    write_project_settings(pytester.path)
    body = (
        "import os, time, pytest\n"
        "@pytest.mark.parametrize('i', range(4))\n"
        "def test_{name}(i, tmp_path_factory):\n"
        "    time.sleep(0.3)\n"
        "    (tmp_path_factory.getbasetemp().parent / f'{name}{{i}}').write_text(\n"
        "        os.environ['PYTEST_XDIST_WORKER'])\n"
    )
    pytester.makepyfile(
        test_grouped="import pytest\npytestmark = pytest.mark.xdist_group('g')\n"
        + body.format(name="grouped"),
        test_plain=body.format(name="plain"),
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=8)
    ran = {p.name: p.read_text() for p in pytester.path.glob("**/grouped*") if p.is_file()}
    assert len(ran) == 4 and len(set(ran.values())) == 1, ran
