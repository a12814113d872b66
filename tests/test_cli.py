"""The ``imagene`` command: --version, help with descriptions and choices, early errors, outputs and timings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import imagene
from imagene._cli import main

ROOT = Path(__file__).resolve().parents[1]


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_version_is_the_package_version():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "imagene", "--version"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert proc.stdout.strip() == f"imagene {declared}" == f"imagene {imagene.__version__}"


def test_every_subcommand_has_a_description_and_lists_its_choices(capsys):
    from imagene.bench import default_methods
    from imagene.bench._methods import TASKS
    from imagene.nn import list_image_encoders

    top = _help(capsys)
    assert "--version" in top and "demo" in top and "bench" in top
    for command in ("demo", "bench"):
        text = _help(capsys, command)
        # argparse prints the description between the usage block and "options:"
        description = text.split("\n\n", 1)[1].split("options:", 1)[0]
        assert len(description.split()) > 20, (command, description)
        flat = " ".join(text.split())
        for name in list_image_encoders():
            assert name in flat, (command, name)
    bench = " ".join(_help(capsys, "bench").split())
    for task in TASKS:
        assert task in bench
        for method in default_methods(task):
            assert method.name in bench, method.name


def test_bench_unknown_method_fails_before_reading_any_data(monkeypatch, tmp_path, data_dir):
    import imagene.bench._data as data

    def _no_reading(*args, **kwargs):
        raise AssertionError("sections were read before --methods was checked")

    monkeypatch.setattr(data, "read_sections", _no_reading)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["bench", "--methods", "nonsense", "--out", str(out), "--data", str(data_dir / "her2st")])
    msg = str(e.value.code)
    assert "nonsense" in msg
    for valid in ("umpire", "bleep_style", "ridge_probe", "stnet_style", "random_reference", "mean_expression"):
        assert valid in msg
    assert not out.exists()  # nothing written either


def test_bench_prints_its_outputs_and_the_time_of_each_step(tmp_path, data_dir, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--data", str(data_dir / "her2st"), "--sections", "C3", "C4", "--methods", "mean_expression",
                 "--encoder", "tiny", "--tile-px", "32", "--quiet", "--out", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    steps = dict(re.findall(r"^\s+(expression[^\n]*?)\s+([\d.]+) s$", stdout, re.M))
    assert set(steps) == {"expression: read, tile, embed", "expression: fit and score"}, stdout
    assert all(float(v) > 0 for v in steps.values())
    printed = re.findall(r"^\s+(\S+\.(?:json|md|csv|png))$", stdout, re.M)
    assert {Path(p).name for p in printed} == {"results.json", "results.md", "expression.csv", "expression.png"}
    assert all(Path(p).is_file() for p in printed)
    assert f"Cached tile features in {out / 'cache'}" in stdout


def test_demo_prints_the_time_of_each_step(monkeypatch, tmp_path, capsys):
    import imagene._demo as demo

    seen = {}

    def _fake_run_demo(out, **kwargs):  # the printing only: the real run is tested in test_demo.py
        seen.update(kwargs, out=out)
        block = {m: {"mean_pearson": 0.25} for m in ("umpire", "ridge_probe", "mean_expression")}
        return {"data": "synthetic sections", "train_sections": ["S0", "S1"], "test_section": "S2", "n_test_spots": 10,
                "hvg50": block,
                "heg50": block, "timings": {"read_s": 1.5, "tiles_s": 2.25, "embed_s": 3.0, "train_s": 40.0,
                                            "total_s": 47.0}}

    monkeypatch.setattr(demo, "run_demo", _fake_run_demo)
    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    stdout = capsys.readouterr().out
    steps = dict(re.findall(r"^\s+(\w+)\s+([\d.]+) s$", stdout, re.M))
    assert steps == {"read": "1.5", "tiles": "2.2", "embed": "3.0", "train": "40.0", "total": "47.0"}, stdout
    assert f"Outputs in {tmp_path}/" in stdout and f"{tmp_path}/metrics.json" in stdout
    assert seen["out"] == str(tmp_path)
