"""Ray Tune search on a real local Ray: ASHA stops trials, failures are reported, the fit job applies the best."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from peftu.cli import main
from peftu.config import SearchSpace, TuneOptions
from peftu.data.io import save_task
from peftu.data.synthetic import generate
from peftu.evaluation.metrics import better
from peftu.store import AdapterStore
from peftu.store.kinds import BEST, TUNE_RESULTS
from peftu.tuning.report import plot_search
from peftu.tuning.search import run_tune

DRAWN = ("r", "alpha", "lr", "epochs")


def _data(tmp_path, keep) -> str:
    """Generated synth-cls users, only those `keep` accepts (small and quick to fit)."""
    spec, users, _ = generate("synth-cls", 60, seed=3)
    chosen = keep(users)
    assert chosen, "the generator gave no user the test can use"
    save_task(tmp_path / "data", spec, chosen)
    return str(tmp_path / "data")


def test_search_stops_poor_trials_reports_failures_and_the_fit_job_uses_the_best(local_ray, tiny_base, tmp_path):
    data = _data(tmp_path, lambda users: [u for u in users if 30 <= len(u.train) <= 48 and len(u.val) >= 4])
    store_uri = str(tmp_path / "store")
    first = {"alpha_ratio": 2.0, "epochs": 3}
    # One trial at a time, so ASHA sees the trials in one order and the run is the same every time
    # (the by-activity test below runs two at a time, as the 2-CPU cluster allows).
    opts = TuneOptions(
        trials=6, users=2, seed=1, max_concurrent=1, fixed={"batch_size": 8},
        points_to_evaluate=[
            first | {"r": 4, "lr": 2e-2},    # learns
            first | {"r": 4, "lr": 1e-5},    # barely moves: ASHA should stop it
            first | {"r": 4096, "lr": 2e-2},  # wider than the tiny base's layers
            first | {"r": 4, "lr": 1e38},    # the loss becomes NaN in the first epoch
        ])
    run = run_tune(data, tiny_base, store_uri, SearchSpace(ranks=[2, 4, 8], lr_min=1e-4, lr_max=0.3, epochs=[1, 2, 3]),
                   opts)
    store = AdapterStore.open(store_uri)
    record = store.get_record(TUNE_RESULTS.of("synth-cls", run.run_id))
    assert store.get_record(TUNE_RESULTS.of("synth-cls", BEST)) == record
    rows = record["buckets"]["all"]["trials"]
    table = "\n".join(f"{t['r']} {t['lr']:.3g} {t['epochs']} {t['status']} {t['epochs_run']} {t['metric']} "
                      f"{t['error']}" for t in rows)
    assert len(rows) == 6, table
    wide = next(t for t in rows if t["r"] == 4096)
    assert wide["status"] == "error" and "rank 4096" in wide["error"], table
    blown = next(t for t in rows if t["lr"] == 1e38)
    assert blown["status"] == "error" and "FloatingPointError" in blown["error"] and "loss" in blown["error"], table
    assert sum(t["status"] in ("done", "stopped") for t in rows) == 4, table  # the search went on
    stopped = [t for t in rows if t["status"] == "stopped"]
    assert stopped and all(t["epochs_run"] < t["epochs"] for t in stopped), table
    summary = run.summary()
    assert summary["trials"] == 6 and summary["stopped_early"] == len(stopped) and summary["errors"] == 2

    done = [t for t in rows if t["status"] == "done"]
    top = done[0]
    for t in done[1:]:
        top = t if better("accuracy", t["metric"], top["metric"]) else top
    best = record["best"]["all"]
    assert summary["best_metric"] == top["metric"] and summary["best_config"] == best
    assert any(t["metric"] == top["metric"] and all(t[k] == best[k] for k in DRAWN) for t in done), table
    assert best["batch_size"] == 8  # the fixed values travel with the config
    plot_search(run, tmp_path / "search.png")
    assert (tmp_path / "search.png").stat().st_size > 10_000

    main(["fit", "--data", data, "--store", store_uri, "--base", tiny_base, "--users", "2", "--config", "best"])
    fitted = store.list_users("synth-cls")
    assert len(fitted) == 2
    assert all(store.manifest("synth-cls", u).hparams == best for u in fitted)


@pytest.mark.slow  # 58 s; the plain search through the fit job stays in `make test`
def test_by_activity_search_and_the_fit_job_applies_each_users_bucket_config(local_ray, tiny_base, tmp_path,
                                                                           capsys):
    def two_per_bucket(users):
        return [u for b in ("few", "some") for u in [u for u in users if u.activity == b and u.val][:2]]

    data = _data(tmp_path, two_per_bucket)
    store_uri = str(tmp_path / "store")
    main(["tune", "--data", data, "--base", tiny_base, "--store", store_uri, "--by-activity", "--trials", "2",
          "--users", "2", "--epochs", "1", "--ranks", "2,4", "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary) >= {"trials", "stopped_early", "best_config", "best_metric", "metric"}
    assert summary["trials"] == 4 and summary["metric"] == "accuracy"
    configs = summary["best_config"]
    assert set(configs) == {"few", "some"} and configs["few"] != configs["some"]

    main(["fit", "--data", data, "--store", store_uri, "--base", tiny_base, "--config", "best", "--lr", "0.01"])
    store = AdapterStore.open(store_uri)
    spec_users = {u: b for b in ("few", "some") for u in _bucket_users(data, b)}
    assert sorted(store.list_users("synth-cls")) == sorted(spec_users)
    for user, bucket in spec_users.items():
        # each user fitted with their bucket's tuned config; a flag given to `fit` wins over it
        assert store.manifest("synth-cls", user).hparams == configs[bucket] | {"lr": 0.01}


def _bucket_users(data: str, bucket: str) -> list[str]:
    from peftu.data.io import load_task

    return [u.user_id for u in load_task(data)[1] if u.activity == bucket]


def test_the_search_settings_refuse_what_no_trial_could_use():
    with pytest.raises(ValidationError, match="need 0 < lr_min <= lr_max"):
        SearchSpace(lr_min=0.1, lr_max=0.01)
    with pytest.raises(ValidationError, match="ranks.0"):
        SearchSpace(ranks=[0, 4])
    with pytest.raises(ValidationError, match="the search draws lr, r: they cannot be fixed"):
        TuneOptions(fixed={"r": 4, "lr": 0.1, "batch_size": 4})
    with pytest.raises(ValidationError, match="batch_sise"):
        TuneOptions(fixed={"batch_sise": 4})
    with pytest.raises(ValidationError, match="batch_size"):
        TuneOptions(fixed={"batch_size": 0})
    assert TuneOptions(fixed={"batch_size": "8"}).fixed == {"batch_size": 8}  # converted as LoraHParams does


def test_tune_help_and_clear_errors(tmp_path):
    from tests.test_cli import peftu

    assert "--by-activity" in peftu("tune", "--help").stdout
    bad = peftu("tune", "--data", str(tmp_path), "--lr-min", "0.1", "--lr-max", "0.01")
    assert bad.returncode == 2 and "need 0 < lr_min <= lr_max" in bad.stderr, bad.stderr
    data = _data(tmp_path, lambda users: users[:2])
    missing = peftu("fit", "--data", data, "--store", str(tmp_path / "empty"), "--config", "best", "--reference")
    assert missing.returncode == 2 and "no tuning results 'best' for task 'synth-cls'" in missing.stderr, missing.stderr
