"""User-centred task data: the record type, loaders, splits, the generator, IO."""

from peftu.data.schema import (
                     ACTIVITY_BUCKETS,
                     LOWER_IS_BETTER,
                     METRICS,
                     SPLITS,
                     Example,
                     HistoryItem,
                     TaskSpec,
                     UserRecord,
                     activity_bucket,
)

__all__ = ["ACTIVITY_BUCKETS", "LOWER_IS_BETTER", "METRICS", "SPLITS", "Example", "HistoryItem",
           "TaskSpec", "UserRecord", "activity_bucket"]
