"""The `peftu` command, run as a user runs it: a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
TWEETEVAL = SHARED / "data" / "peft-u" / "tweeteval" / "annotations_g3.csv"


def peftu(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the command; `peftu fit` starts its own local Ray, never joining another test's cluster."""
    return subprocess.run([sys.executable, "-m", "peftu", *args], capture_output=True, text=True, check=False,
                          timeout=600, env={**os.environ, "RAY_ADDRESS": "local", **(env or {})})


def test_help_from_the_command_line():
    result = peftu("--help")
    assert result.returncode == 0, result.stderr
    assert "usage: peftu" in result.stdout


HEAVY = ("torch", "transformers", "peft", "ray", "datasets", "boto3")


def test_the_parser_is_built_without_the_ml_stack():
    """What keeps every `--help` quick: building the whole parser imports none of HEAVY (they load
    inside the commands). Checked in a fresh interpreter, as `peftu` starts."""
    code = f"import sys, peftu.cli; peftu.cli.build_parser(); print([m for m in {HEAVY!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"building the parser imported {result.stdout.strip()}"


@pytest.mark.parametrize("command", [
    ["data"], ["data", "generate"], ["data", "import"], ["data", "stats"], ["base", "build"],
    ["fit"], ["eval"], ["store", "sweep"], ["tune"], ["bench", "quality"], ["bench", "fit"], ["bench", "serve"],
    ["serve"], ["serve", "token"], ["pplug", "fit"], ["pplug", "eval"]])
def test_every_subcommand_has_help(command, capsys):
    """In this process (the subprocess above shows the entry point works)."""
    from peftu.cli import main

    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert f"usage: peftu {' '.join(command)}" in capsys.readouterr().out


def test_a_bad_setting_is_one_line_naming_the_field(tmp_path, capsys):
    """Flags become settings models (`peftu.config`); what a model refuses is a clear error, before any Ray."""
    from peftu.cli import main

    main(["data", "generate", "--users", "3", "--out", str(tmp_path / "cls")])
    with pytest.raises(SystemExit) as exited:
        main(["fit", "--data", str(tmp_path / "cls"), "--base", str(tmp_path / "no-base"), "--r", "0"])
    assert exited.value.code == 2
    assert "invalid LoraHParams: r: Input should be greater than or equal to 1" in capsys.readouterr().err


def test_data_commands_reach_s3_at_the_endpoint_given(s3_server, s3_store_uri, capsys):
    """`--endpoint-url` is the only way the data commands learn of moto here: no AWS_ENDPOINT_URL is set."""
    from peftu.cli import main

    assert "AWS_ENDPOINT_URL" not in os.environ
    uri = s3_store_uri + "/data/cls"
    main(["data", "generate", "--users", "12", "--out", uri, "--endpoint-url", s3_server])
    assert f"to {uri}" in capsys.readouterr().out
    main(["data", "stats", uri, "--endpoint-url", s3_server])
    assert json.loads(capsys.readouterr().out)["users"] == 12


def test_generate_then_stats(tmp_path):
    out = tmp_path / "cls"
    result = peftu("data", "generate", "--task", "synth-cls", "--users", "25", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "25 kept" in result.stdout
    stats = json.loads(peftu("data", "stats", str(out)).stdout)
    assert stats["users"] == 25 and stats["kind"] == "classification"
    assert set(stats["labels"]) <= {"like", "dislike", "neutral"}
    assert stats["history_items"]["min"] >= 8


@pytest.mark.skipif(not TWEETEVAL.exists(), reason=f"{TWEETEVAL} is not there")
def test_import_the_real_peft_u_annotations(tmp_path):
    result = peftu("data", "import", "peft-u-csv", str(TWEETEVAL), "--out", str(tmp_path / "tw"))
    assert result.returncode == 0, result.stderr
    stats = json.loads(peftu("data", "stats", str(tmp_path / "tw")).stdout)
    assert stats["users"] == 20
    assert stats["examples"] == {"train": 3200, "val": 400, "test": 400}
    assert set(stats["labels"]) == {"Hateful", "Non-hateful"}


def test_bad_input_is_one_clear_line_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,text,label_A\n1,hello,yes\n2,short\n")
    result = peftu("data", "import", "peft-u-csv", str(bad), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "bad.csv" in result.stderr and "line 3" in result.stderr
    assert not (tmp_path / "out").exists()


def test_fit_then_eval_through_the_cli(tmp_path, tiny_base):
    data, store = tmp_path / "rating", tmp_path / "store"
    assert peftu("data", "generate", "--task", "synth-rating", "--users", "3",
                 "--out", str(data)).returncode == 0
    fit = peftu("fit", "--data", str(data), "--base", tiny_base, "--store", str(store),
                "--epochs", "1", "--r", "4", "--no-select", "--reference")  # Ray, selection: tests/test_fit_job.py
    assert fit.returncode == 0, fit.stderr
    assert "fitted 3, skipped 0" in fit.stdout  # a re-run skipping all: tests/test_fit_job.py
    result = peftu("eval", "--data", str(data), "--base", tiny_base, "--store", str(store))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["users_without_adapter"] == 0
    assert report["per_user"]["all"]["n"] == 3 and "mae" in report["base"]["all"]


def test_store_sweep_removes_only_old_half_written_versions(tmp_path):
    import time

    from peftu.store import AdapterStore

    store = AdapterStore.open(str(tmp_path / "store"))
    hour_ago, now = time.time_ns() - 3600 * 10**9, time.time_ns()
    old, live = (f"adapters/t/alice/versions/{t:020d}-0000000{i}" for i, t in enumerate((hour_ago, now)))
    pooled = f"task-adapters/t/versions/{hour_ago:020d}-00000002"  # every kind of the task is swept
    for version in (old, live, pooled):
        store.backend.put(f"{version}/adapter_model.safetensors", b"half")
    result = peftu("store", "sweep", "--task", "t", "--store", str(tmp_path / "store"), "--older-than", "30")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [old, pooled,
                                          "removed 2 half-written version(s) of t started over 30 min ago"]
    assert store.backend.list(old) == [] and store.backend.list(live) != []


def test_missing_data_is_a_clear_error(tmp_path, tiny_base):
    result = peftu("fit", "--data", str(tmp_path / "nothing"), "--base", tiny_base)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "nothing" in result.stderr
