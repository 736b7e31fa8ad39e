"""A local multi-node Ray cluster on one machine, and a job launcher for it (or any Ray head)."""
