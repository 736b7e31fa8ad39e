"""Searching LoRA hyper-parameters with Ray Tune: `search` runs a search, `report` holds, reads back and
shows what it found (`peftu fit --config` applies it)."""
