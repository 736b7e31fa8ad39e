"""Neighbours: a user's own labels on the texts most like the one asked about.

A label task's user has labelled texts before (their training split). The
candidate `neighbors` embeds those texts with the frozen sentence encoder
(the same all-MiniLM-L6-v2 PPlug uses, `peftu.pplug.encoder`) and answers a
new text with the labels of its `K` most similar ones, each weighted by
``exp(similarity / TEMPERATURE)``. It reads the text, as the tiny base cannot,
and it knows the user, as the base does not: on PEFT-U's response_sentiment
a worker's labels of similar hearing answers predict their next label far
better than their usual label does (docs/results.md).

Its label scores are log vote shares (add `SMOOTHING` so that no label is
impossible), so the selection adds the user's prior to them as to a model's
(`neighbors+prior`). The selection publishes every user's vectors and labels
(store kind `NEIGHBORS`, embedded again only when the texts or labels
change); a replica reads them there and embeds only the request's text
(`peftu.serving.neighbors`).
"""
