"""Per-user splits the way PEFT-U makes them.

Each user's samples are shuffled with a seed derived from the run seed and the
user id (so a user's split does not change when other users are added), cut
80/10/10, and users with too few samples are dropped. The train split doubles
as the user's history, as in PEFT-U where a user's past annotations are all
there is to learn from.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from peftu.data.schema import Example, HistoryItem, UserRecord


@dataclass
class SplitReport:
    users_in: int
    users_kept: int
    users_dropped: int
    train: int
    val: int
    test: int

    def __str__(self) -> str:
        return (f"users: {self.users_kept} kept, {self.users_dropped} dropped "
                f"(of {self.users_in}); examples: train {self.train}, val {self.val}, "
                f"test {self.test}")


def user_seed(seed: int, user_id: str) -> int:
    """A per-user seed that depends only on the run seed and the user id."""
    digest = hashlib.sha256(f"{seed}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def split_user(user_id: str, samples: list[Example], *, seed: int = 0,
               fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> UserRecord:
    """Shuffle one user's samples and cut them into train/val/test.

    Val and test get at least one sample each when there are three or more.
    """
    order = list(samples)
    random.Random(user_seed(seed, user_id)).shuffle(order)
    n = len(order)
    n_val = max(1, round(n * fractions[1])) if n >= 3 else 0
    n_test = max(1, round(n * fractions[2])) if n >= 3 else 0
    n_train = n - n_val - n_test
    train, val, test = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    history = [HistoryItem(id=e.id, text=e.input, output=e.output) for e in train]
    return UserRecord(user_id=user_id, history=history, train=train, val=val, test=test)


def split_users(samples: dict[str, list[Example]], *, seed: int = 0, min_samples: int = 10,
                fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                ) -> tuple[list[UserRecord], SplitReport]:
    """Split every user; drop those with fewer than `min_samples` samples."""
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {fractions}")
    users = [split_user(uid, s, seed=seed, fractions=fractions)
             for uid, s in samples.items() if len(s) >= min_samples]
    report = SplitReport(
        users_in=len(samples), users_kept=len(users), users_dropped=len(samples) - len(users),
        train=sum(len(u.train) for u in users), val=sum(len(u.val) for u in users),
        test=sum(len(u.test) for u in users))
    return users, report
