"""`peftu bench quality` and the demo's table: ways of personalizing a task, on the same users and split.

`context` is what every method is given (the task, its users, the base, the
store, the settings), `methods` the registry of methods (one row each),
`personalize` the retrieval and profile prompts some methods use, `run` reads
a task's users and runs the methods, and `report` merges, tabulates and plots
the results.
"""
