"""A fresh install works: the wheel carries tasks and checkpoints, `lmms-plugins path` / `env`
report them, known-broken environments are caught with their fix, and drift from the lock fails CI."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lmms_eval_plugins.commands import compare, env
from lmms_eval_plugins.paths import CHECKPOINTS, named_paths, tasks_dir

REPO = Path(__file__).resolve().parents[1]


def test_paths_name_the_tasks_and_every_shipped_checkpoint(capsys):
    from lmms_eval_plugins.cli import main

    assert (tasks_dir() / "shapeworld" / "shapeworld_pope_adversarial.yaml").is_file()
    for name in ("tasks", *CHECKPOINTS):
        assert main(["path", name]) == 0
        printed = Path(capsys.readouterr().out.strip())
        assert printed == named_paths()[name] and printed.is_dir()
    assert (named_paths()["shapeworld-tiny"] / "config.json").is_file()


def test_wheel_carries_the_task_configs_and_checkpoints(tmp_path):
    # build from a copy: pip builds in-tree, and a stale build/ could hide a file missing from the source
    src = tmp_path / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "results", ".pytest_cache"),
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = next(tmp_path.glob("lmms_eval_plugins-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in (REPO / "task_configs").rglob("*"):
        if f.is_file() and "__pycache__" not in f.parts:
            assert f"lmms_eval_plugins/task_configs/{f.relative_to(REPO / 'task_configs').as_posix()}" in names
    # every module of the two packages: a subpackage missing from setup.cfg's list installs
    # without its files, and only a non-editable install notices
    for top in ("methods", "lmms_eval_plugins"):
        for f in (REPO / top).rglob("*.py"):
            if "__pycache__" not in f.parts:
                assert f.relative_to(REPO).as_posix() in names, f"{f.relative_to(REPO)}: add its package to setup.cfg"
    for f in (REPO / "lmms_eval_plugins" / "recipes").glob("*.yaml"):  # data the package reads
        assert f.relative_to(REPO).as_posix() in names, f.name
    for name, path in CHECKPOINTS.items():
        rel = path.relative_to(REPO).as_posix()
        assert f"{rel}/config.json" in names, name
        assert any(n.startswith(rel) and n.endswith(".safetensors") for n in names), name
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: filelock<4.3" in metadata


def test_env_finds_nothing_wrong_in_the_tested_environment(capsys):
    assert env.problems() == []
    assert env.main(None) == 0
    out = capsys.readouterr().out
    for key in ("torch", "transformers", "lmms-eval", "filelock", "path tasks", "path shapeworld-tiny"):
        assert key in out


def test_env_reports_the_filelock_break_with_its_fix(monkeypatch, capsys):
    real = env.importlib.util.find_spec
    monkeypatch.setattr(
        env.importlib.util, "find_spec", lambda name, *a: None if name == "filelock._api" else real(name, *a)
    )
    found = env.problems()
    assert len(found) == 1 and "filelock._api" in found[0] and 'pip install "filelock<4.3"' in found[0]
    assert env.main(None) == 1
    assert "PROBLEMS" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="filelock"):
        env.check_or_exit()


@pytest.mark.parametrize(
    "dist, bad, expect",
    [
        ("transformers", "4.57.1", "outside the supported range"),
        ("lmms-eval", "0.8.0", "outside the supported 0.7.x"),
        ("peft", None, "not installed"),
    ],
)
def test_env_checks_declared_ranges(monkeypatch, dist, bad, expect):
    real = env.version
    monkeypatch.setattr(env, "version", lambda d: bad if d == dist else real(d))
    found = env.problems()
    assert any(dist in p and expect in p and "fix: pip install" in p for p in found), found


def test_compare_run_stops_before_lmms_eval_on_a_known_break(monkeypatch, tmp_path):
    monkeypatch.setattr(env, "problems", lambda: ["filelock 4.3.1 has no `filelock._api`; fix: ..."])

    def must_not_run(*a, **k):
        raise AssertionError("lmms-eval was started in a broken environment")

    monkeypatch.setattr("lmms_eval_plugins.testing.run_lmms_eval", must_not_run)
    with pytest.raises(SystemExit, match="filelock"):
        compare.run_pair("llava_pai", "alpha=0.5", "shapeworld_pope_adversarial", "shapeworld-tiny", tmp_path)


def test_first_error_of_an_lmms_eval_log():
    log = (
        "\x1b[32m2026-11-29 14:49:04\x1b[0m | \x1b[1mINFO    \x1b[0m | starting\n"
        'Traceback (most recent call last):\n  File "x.py", line 1\n'
        "ModuleNotFoundError: No module named 'filelock._api'\n"
        "\x1b[32m2026-11-29 14:49:04\x1b[0m | \x1b[31mERROR   \x1b[0m | cli_evaluate:614 - Error during evaluation: "
        "No module named 'filelock._api'.\n"
    )
    assert compare.first_error(log).endswith("Error during evaluation: No module named 'filelock._api'.")
    assert compare.first_error("Traceback\nValueError: bad model_args\n") == "ValueError: bad model_args"
    assert compare.first_error("all fine\n") == "(no error line in the log)"


def _check_lock(lock: Path):
    return subprocess.run(
        [sys.executable, str(REPO / ".ci" / "check_lock.py"), str(lock)], capture_output=True, text=True
    )


def test_ci_lock_check_fails_on_drift(tmp_path):
    import importlib.metadata as md

    pins = [
        f"{d.metadata['Name']}=={d.version}"
        for d in md.distributions()
        if d.metadata["Name"] not in ("lmms-eval-plugins", "lmms_eval_plugins")
    ]
    exact = tmp_path / "exact.lock"
    exact.write_text("\n".join(pins) + "\n")
    assert _check_lock(exact).returncode == 0
    drifted = tmp_path / "drifted.lock"
    kept = [p for p in pins if not p.lower().startswith(("scipy==", "transformers=="))]
    drifted.write_text("\n".join([*kept, "transformers==0.0.1", "not-a-real-package==1.0"]) + "\n")
    proc = _check_lock(drifted)
    assert proc.returncode == 1
    assert "transformers: locked 0.0.1, installed" in proc.stdout
    assert "not-a-real-package==1.0" in proc.stdout  # locked but missing
    assert "scipy==" in proc.stdout  # installed but not locked


def test_the_lock_pins_the_torch_build_and_excludes_the_broken_filelock():
    pins = dict(
        line.split("==", 1)
        for line in (REPO / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert pins["torch"].strip() == "2.14.1" and pins["torchvision"].strip() == "0.29.1"
    major, minor = (int(x) for x in pins["filelock"].split(".")[:2])
    assert (major, minor) < (4, 3)
