"""The record type, per-user splits, the synthetic generator and Parquet IO."""

from __future__ import annotations

import collections
import os
import statistics

import pytest

from peftu.data.io import load_spec, load_task, load_user_ids, load_users, save_task
from peftu.data.schema import Example, TaskSpec, activity_bucket
from peftu.data.split import split_user, split_users
from peftu.data.synthetic import TASKS, generate, generate_samples
from peftu.errors import DataError


def test_task_spec_validates_kind_labels_and_metric():
    with pytest.raises(ValueError, match="placeholder"):
        TaskSpec(name="t", kind="generation", prompt="no field")
    with pytest.raises(ValueError, match="at least two labels"):
        TaskSpec(name="t", kind="classification", prompt="{input}", labels=["a"])
    # Named rating levels are positions on the scale (PEFT-U's sentiment levels).
    assert TaskSpec(name="t", kind="rating", prompt="{input}", labels=["low", "high"]).level_values() == \
        {"low": 0.0, "high": 1.0}
    with pytest.raises(ValueError, match="does not fit"):
        TaskSpec(name="t", kind="rating", prompt="{input}", labels=["1", "2"], metric="f1")
    spec = TaskSpec(name="t", kind="rating", prompt="Q: {input} A:", labels=["1", "2"])
    assert spec.metric == "mae" and spec.render("x") == "Q: x A:"


def test_split_is_80_10_10_seeded_and_stable_per_user():
    samples = [Example(id=str(i), input=f"x{i}", output="a") for i in range(50)]
    user = split_user("alice", samples, seed=3)
    assert (len(user.train), len(user.val), len(user.test)) == (40, 5, 5)
    assert sorted(e.id for e in user.train + user.val + user.test) == sorted(e.id for e in samples)
    assert [h.id for h in user.history] == [e.id for e in user.train]
    assert split_user("alice", samples, seed=3) == user
    assert split_user("alice", samples, seed=4).test != user.test
    # A user's split does not depend on who else is in the data set.
    alone, _ = split_users({"alice": samples}, seed=3)
    with_bob, _ = split_users({"bob": samples[:20], "alice": samples}, seed=3)
    assert alone[0] == next(u for u in with_bob if u.user_id == "alice")


def test_split_drops_small_users_and_counts_them():
    samples = {"big": [Example(str(i), "x", "a") for i in range(12)],
               "small": [Example(str(i), "x", "a") for i in range(9)]}
    users, report = split_users(samples, min_samples=10)
    assert [u.user_id for u in users] == ["big"]
    assert (report.users_in, report.users_kept, report.users_dropped) == (2, 1, 1)
    assert report.train + report.val + report.test == 12
    assert "1 dropped" in str(report)


def test_generator_is_deterministic_and_long_tailed():
    a = generate_samples("synth-rating", 300, seed=5)
    assert a == generate_samples("synth-rating", 300, seed=5)
    assert a != generate_samples("synth-rating", 300, seed=6)
    # A user's data does not depend on how many users are generated.
    assert generate_samples("synth-rating", 3, seed=5, first_index=7)["u000007"] == a["u000007"]
    sizes = [len(s) for s in a.values()]
    assert min(sizes) >= 10
    assert statistics.median(sizes) < 30 < max(sizes)
    assert max(sizes) >= 100


def test_classification_users_disagree_on_the_same_items():
    samples = generate_samples("synth-cls", 400, seed=0)
    labels_by_item = collections.defaultdict(set)
    for examples in samples.values():
        for e in examples:
            labels_by_item[e.id].add(e.output)
    shared = [labels for labels in labels_by_item.values() if len(labels) > 1]
    assert len(shared) > 0.5 * len(labels_by_item)
    # Users are consistent with themselves: their majority label covers most of their items.
    agreement = [collections.Counter(e.output for e in ex).most_common(1)[0][1] / len(ex)
                 for ex in samples.values()]
    assert statistics.mean(agreement) > 0.5


def test_rating_users_differ_in_bias():
    samples = generate_samples("synth-rating", 200, seed=1)
    means = [statistics.mean(int(e.output) for e in ex) for ex in samples.values() if len(ex) >= 30]
    assert max(means) - min(means) > 1.0


def test_generation_users_have_their_own_style():
    samples = generate_samples("synth-gen", 50, seed=2)
    openers = {uid: {e.output.split()[0] for e in ex} for uid, ex in samples.items()}
    assert all(len(o) == 1 for o in openers.values())
    assert len({next(iter(o)) for o in openers.values()}) > 2


def test_activity_buckets():
    assert [activity_bucket(n) for n in (10, 24, 25, 99, 100, 400)] == [
        "few", "few", "some", "some", "many", "many"]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_save_and_load_roundtrip(tmp_path, task):
    spec, users, _ = generate(task, 30, seed=0)
    save_task(tmp_path / "ds", spec, users)
    spec2, users2 = load_task(tmp_path / "ds")
    assert spec2 == spec == load_spec(tmp_path / "ds")
    assert users2 == users
    with pytest.raises(DataError, match="nope/task.json: missing"):
        load_spec(tmp_path / "nope")


def test_a_worker_reads_only_its_own_users(tmp_path, monkeypatch):
    """The driver reads the ids alone; a worker reads its share's rows, in the order given, and only
    the Parquet row groups that hold them."""
    from datasets import Dataset

    from peftu.data import io

    spec, users, _ = generate("synth-rating", 40, seed=2)
    save_task(tmp_path / "ds", spec, users)
    assert load_user_ids(tmp_path / "ds") == (spec, [u.user_id for u in users])
    share = [users[31].user_id, users[2].user_id, users[17].user_id]
    assert load_users(tmp_path / "ds", share) == [users[31], users[2], users[17]]
    Dataset.from_list([u.to_row() for u in users], features=io.FEATURES).to_parquet(
        str(tmp_path / "ds" / "users.parquet"), batch_size=10)  # four row groups of ten users
    decoded = []
    real = io.checked_row
    monkeypatch.setattr(io, "checked_row", lambda row, source: decoded.append(row["user_id"]) or real(row, source))
    assert load_users(tmp_path / "ds", [users[35].user_id]) == [users[35]]
    assert decoded == [users[35].user_id]
    with pytest.raises(DataError, match=r"users\.parquet.*1 user\(s\) not in the data set, e.g. 'nobody'"):
        load_users(tmp_path / "ds", ["nobody"])


def test_save_replaces_whole_and_leaves_nothing_behind(tmp_path, monkeypatch):
    spec, users, _ = generate("synth-cls", 20, seed=0)
    target = tmp_path / "ds"
    save_task(target, spec, users)

    from peftu.data import io

    def broken(folder, spec, users):
        (folder / "users.parquet").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(io, "_write_local", broken)
    with pytest.raises(OSError):
        save_task(target, spec, users[:5])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert len(load_task(target)[1]) == len(users)


def test_duplicate_user_ids_are_refused(tmp_path):
    spec, users, _ = generate("synth-cls", 2, seed=0)
    users[1].user_id = users[0].user_id
    with pytest.raises(DataError, match="duplicate user id"):
        save_task(tmp_path / "ds", spec, users)


def test_load_names_the_bad_file_and_field(tmp_path):
    spec, users, _ = generate("synth-cls", 5, seed=0)
    save_task(tmp_path / "ds", spec, users)
    (tmp_path / "ds" / "task.json").write_text('{"name": "t", "kind": "poem", "prompt": "{input}"}')
    with pytest.raises(DataError, match=r"task\.json.*field 'kind'"):
        load_task(tmp_path / "ds")
    (tmp_path / "ds" / "task.json").write_text(spec.model_dump_json())
    (tmp_path / "ds" / "users.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"users\.parquet.*Parquet"):
        load_task(tmp_path / "ds")
    with pytest.raises(DataError, match="missing"):
        load_task(tmp_path / "nowhere")


def test_save_and_load_through_s3_at_the_endpoint_given(s3_server, s3_store_uri):
    """The endpoint is passed, as `--endpoint-url` passes it: none comes from the environment."""
    import boto3

    assert "AWS_ENDPOINT_URL" not in os.environ and "AWS_ENDPOINT_URL_S3" not in os.environ
    spec, users, _ = generate("synth-gen", 15, seed=4)
    uri = s3_store_uri + "/data/gen"
    save_task(uri, spec, users, endpoint_url=s3_server)
    bucket, prefix = uri[len("s3://"):].split("/", 1)
    listed = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=bucket, Prefix=prefix)
    assert sorted(o["Key"] for o in listed["Contents"]) == [f"{prefix}/task.json", f"{prefix}/users.parquet"]
    spec2, users2 = load_task(uri, endpoint_url=s3_server)
    assert (spec2, users2) == (spec, users)
    assert load_spec(uri, endpoint_url=s3_server) == spec
    assert load_user_ids(uri, endpoint_url=s3_server) == (spec, [u.user_id for u in users])
    assert load_users(uri, [users[3].user_id], endpoint_url=s3_server) == [users[3]]
    with pytest.raises(DataError, match="missing"):
        load_task(s3_store_uri + "/data/none", endpoint_url=s3_server)
    with pytest.raises(DataError, match="none/task.json: missing"):
        load_spec(s3_store_uri + "/data/none", endpoint_url=s3_server)
