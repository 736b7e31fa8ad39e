"""Loaders that turn public user-centred benchmarks into TaskSpec + UserRecords.

Every loader returns the same shape, ``(spec, users, report)``:

- ``spec``: the `TaskSpec` (kind, prompt, label set, metric);
- ``users``: a list of `UserRecord`, in the order the users appear in the file;
- ``report``: a `SplitReport` counting users read, kept and dropped, and the
  train/val/test examples of the kept users.

Malformed input raises `DataError` naming the file, where in it (CSV: the
1-based physical line; JSON: the record path such as
``user 'u3' / train / sample 's9'``, or the line of a syntax error) and the
field. The only things dropped are those the rules below name:

- users with fewer than ``min_samples`` samples (PEFT-U loaders; counted in
  the report);
- blank CSV lines, which carry no data;
- LaMP profile items with an empty text or output, which stay in the user's
  history but make no train example.

`peft_u` reads PEFT-U's annotator table and `user_data.json`, `lamp` a LaMP
split, and `reading` holds what they share: strict JSON and CSV reading and the
checks of single fields.
"""

from peftu.data.loaders.lamp import LAMP_TASKS, LampTask, load_lamp
from peftu.data.loaders.peft_u import load_peftu_annotations, load_peftu_user_data
from peftu.data.loaders.reading import LoadResult

__all__ = ["LAMP_TASKS", "LampTask", "LoadResult", "load_lamp", "load_peftu_annotations", "load_peftu_user_data"]
