"""`peftu bench store`: the store at N users, on moto's S3 server (started here, on loopback) or a local folder.

What a fit job costs the store: publishing (with as many publishers at once as
the job has workers), planning (which of N users are current: all of them, or
half), listing the users, and the index's size. Publishing N fake adapters
for real would take long at 100,000 users, so `publish` users (default 500) are
published for real through the whole protocol and the rest of the N users'
entries are written into the index snapshot in bulk, as a compaction would
have written them (their pointers are not written: planning and listing read
the index, never them). Planning is timed twice: right after the publishes,
with their change marks not yet folded in (each marked user's pointer and
manifest are read), and once compacted.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from peftu.errors import PeftuError
from peftu.store import AdapterStore, fingerprint
from peftu.store.index import SNAPSHOT, Entry, encode_snapshot
from peftu.store.kinds import ADAPTER
from peftu.store.manifest import _new_version

TASK = "bench-store"
BASE_FP = fingerprint({"bench": "base"})
HPARAMS = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}


@dataclass
class StoreBenchResult:
    users: int
    backend: str
    published: int
    """Users published for real (the rest were written into the index in bulk)."""
    concurrency: int
    publish_ms_per_user: float
    """Wall time of the publishes over their number: per user at that many publishers at once."""
    plan_marked_s: float
    """Planning all N users right after the publishes, their marks not folded in yet."""
    compact_s: float
    plan_s: float
    """Planning all N users, all current, from the compacted index."""
    plan_half_s: float
    """Planning all N users, half current (the other half's data changed)."""
    list_s: float
    index_bytes: int

    @property
    def plan_ms_per_user(self) -> float:
        return self.plan_s * 1000 / self.users

    def summary(self) -> dict:
        return {**asdict(self), "plan_ms_per_user": self.plan_ms_per_user}


@contextmanager
def moto_store() -> Iterator[AdapterStore]:
    """A fresh bucket on moto's S3 server, started in this process on loopback (nothing reaches AWS)."""
    import boto3
    from moto.server import ThreadedMotoServer

    from peftu.serving.local import free_port

    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench")):
        os.environ.setdefault(name, value)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint, bucket = f"http://127.0.0.1:{port}", f"peftu-bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        yield AdapterStore.open(f"s3://{bucket}/store", endpoint_url=endpoint)
    finally:
        server.stop()


@contextmanager
def local_store() -> Iterator[AdapterStore]:
    with tempfile.TemporaryDirectory(prefix="peftu-bench-store-") as folder:
        yield AdapterStore.open(folder)


def _user(i: int) -> str:
    return f"user-{i:07d}"


def _data_fp(user: str) -> str:
    return fingerprint({"user": user})


def _fake_adapter(user: str, size: int) -> dict[str, bytes]:
    """A PEFT pair's shape: a JSON config and `size` bytes of weights (the store checks only JSON files)."""
    return {"adapter_config.json": json.dumps({"peft_type": "LORA", **HPARAMS}).encode(),
            "adapter_model.safetensors": os.urandom(size)}


def _check(ok: bool, problem: str) -> None:
    """A benchmark that measured a wrong answer measured nothing."""
    if not ok:
        raise PeftuError(f"bench store: {problem}")


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_store(users: int, backend: str, *, publish: int = 500, concurrency: int = 4,
                adapter_bytes: int = 64 * 1024) -> StoreBenchResult:
    """One run at `users` users on `backend` ("s3": moto's server, or "local")."""
    if users < 2:
        raise PeftuError(f"--users must be at least 2, not {users}")
    opener = {"s3": moto_store, "local": local_store}[backend]
    ids = [_user(i) for i in range(users)]
    published = ids[: min(publish, users)]
    hp_fp = fingerprint(HPARAMS)
    with opener() as store:
        def one(user: str) -> None:
            store.publish(TASK, user, _fake_adapter(user, adapter_bytes), base_fingerprint=BASE_FP,
                          data_fingerprint=_data_fp(user), hparams=HPARAMS)

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            publish_s, _ = _timed(lambda: list(pool.map(one, published)))
        # The rest in bulk: the snapshot a compaction would have written had they been published.
        bulk = {u: Entry(_new_version(), BASE_FP, None, _data_fp(u), hp_fp) for u in ids[len(published):]}
        store.backend.put(f"indexes/{ADAPTER.root}/{TASK}/{SNAPSHOT}", encode_snapshot(bulk))

        all_current = {u: (BASE_FP, _data_fp(u), hp_fp) for u in ids}
        half_current = {u: (BASE_FP, _data_fp(u) if i % 2 else "changed", hp_fp) for i, u in enumerate(ids)}
        plan_marked_s, fresh = _timed(lambda: store.current_owners(ADAPTER, TASK, all_current))
        _check(len(fresh) == users, f"{users - len(fresh)} users not current: the index is wrong")
        compact_s, _ = _timed(lambda: store.compact_index(ADAPTER, TASK))
        plan_s, fresh = _timed(lambda: store.current_owners(ADAPTER, TASK, all_current))
        _check(len(fresh) == users, f"{users - len(fresh)} users not current after compaction")
        plan_half_s, fresh = _timed(lambda: store.current_owners(ADAPTER, TASK, half_current))
        _check(len(fresh) == users // 2, f"{len(fresh)} users current, not {users // 2}")
        list_s, listed = _timed(lambda: store.list_users(TASK))
        _check(listed == ids, f"listed {len(listed)} users, not the {users} in the index")
        return StoreBenchResult(users=users, backend=backend, published=len(published), concurrency=concurrency,
                                publish_ms_per_user=publish_s * 1000 / max(1, len(published)),
                                plan_marked_s=plan_marked_s, compact_s=compact_s, plan_s=plan_s,
                                plan_half_s=plan_half_s, list_s=list_s,
                                index_bytes=store.index(ADAPTER, TASK).size())


def render_store_table(results: list[StoreBenchResult]):
    from rich.table import Table

    table = Table(title="store at N users (publish: per user at that many publishers at once)")
    for col in ("backend", "users", "published", "publish ms/user", "plan (marks) s", "compact s",
                "plan s", "plan ms/user", "plan half s", "list s", "index KiB"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r.backend, f"{r.users:,}", f"{r.published:,} x{r.concurrency}", f"{r.publish_ms_per_user:.1f}",
                      f"{r.plan_marked_s:.2f}", f"{r.compact_s:.2f}", f"{r.plan_s:.3f}",
                      f"{r.plan_ms_per_user:.4f}", f"{r.plan_half_s:.3f}", f"{r.list_s:.3f}",
                      f"{r.index_bytes / 1024:,.0f}")
    return table


def plot_store(results: list[StoreBenchResult], path: str | Path) -> None:
    """Planning and listing time against users, one line per backend and measure (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for backend in sorted({r.backend for r in results}):
        rows = sorted((r for r in results if r.backend == backend), key=lambda r: r.users)
        xs = [r.users for r in rows]
        for field, label in (("plan_s", "plan, all current"), ("plan_half_s", "plan, half current"),
                             ("plan_marked_s", "plan, publishes not compacted"), ("list_s", "list users")):
            ax.plot(xs, [getattr(r, field) for r in rows], marker="o", label=f"{backend}: {label}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("users")
    ax.set_ylabel("seconds")
    ax.set_title("peftu bench store: planning and listing vs users")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
