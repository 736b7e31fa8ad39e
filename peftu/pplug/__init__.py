"""PPlug (Persona-Plug): a frozen history encoder, a trained plug, soft tokens for a frozen LM.

`encoder` embeds history items (and caches them per user in the store),
`model` is the plug and how its soft tokens enter the LM, `evaluate` scores
users with it (alone or with their adapters): what a replica needs. `train`
fits it on Ray Train. Nothing is re-exported here, so a replica that imports
the plug never imports its fit.
"""
