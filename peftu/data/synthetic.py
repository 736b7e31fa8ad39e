"""Generated users whose preferences really differ, for the demo, tests and benchmarks.

Three tasks mirror the benchmarks peftu is built for:

- `synth-cls` (as PEFT-U): everyone labels posts from one shared pool, and users
  disagree. Posts belong to topics in two groups; each user has a preferred
  label per group (half the users share the crowd's choice) and follows it 90%
  of the time. A population-level model can only learn the crowd's choice.
- `synth-rating` (as LaMP-3): reviews carry a quality level in their wording;
  a user's 1-5 rating is `3 + bias + scale * quality`, so harsh, generous,
  cautious and extreme raters give the same review different stars.
- `synth-gen` (as LaMP-4/7): news facts become headlines in the user's style:
  their own opening word and their own choice of verb.

Activity is long-tailed: the number of samples per user follows a Pareto law
from 10 up to a few hundred. Users are generated independently from
`(seed, user index)`, so a run of 100,000 users takes seconds to minutes and a
user's data does not depend on how many others were generated.
"""

from __future__ import annotations

import random
from functools import partial

from peftu.data.schema import Example, TaskSpec, UserRecord
from peftu.data.split import SplitReport, split_users

TOPIC_GROUPS: dict[str, dict[str, list[str]]] = {
    "leisure": {
        "football": ["match", "goal", "striker", "league", "stadium", "coach"],
        "cooking": ["recipe", "oven", "garlic", "pasta", "chef", "kitchen"],
        "music": ["album", "guitar", "concert", "band", "chorus", "drummer"],
        "gaming": ["console", "level", "quest", "controller", "boss", "arcade"],
    },
    "civic": {
        "politics": ["senate", "vote", "mayor", "budget", "minister", "policy"],
        "science": ["lab", "telescope", "vaccine", "physics", "theory", "experiment"],
        "economy": ["market", "inflation", "tax", "wages", "bank", "trade"],
        "transport": ["train", "bus", "bridge", "highway", "airport", "ticket"],
    },
}
SUBJECTS = ["my neighbour", "the reporter", "a friend", "my sister", "the teacher",
            "our group", "a stranger", "the author", "my uncle", "the panel"]
VERBS = ["talked about", "posted about", "argued over", "laughed at", "wrote about",
         "shared a story on", "asked about", "complained about"]
CLS_LABELS = ["like", "dislike", "neutral"]

PRODUCTS = ["blender", "jacket", "lamp", "backpack", "kettle", "headset", "chair",
            "toaster", "umbrella", "notebook", "speaker", "mattress"]
QUALITY_WORDS = {
    -2: ["awful", "broken", "useless"],
    -1: ["poor", "flimsy", "disappointing"],
    0: ["okay", "average", "decent"],
    1: ["good", "solid", "nice"],
    2: ["excellent", "superb", "perfect"],
}
DETAILS = ["after a week", "for the price", "out of the box", "in daily use",
           "compared to my old one", "as a gift", "on the first day"]

ENTITIES = ["the mayor", "the council", "a local startup", "the university", "the museum",
            "the hospital", "a famous chef", "the football club", "the zoo", "the library"]
EVENTS = {
    "open": ["opens", "unveils", "launches"],
    "close": ["closes", "shuts", "ends"],
    "win": ["wins", "secures", "claims"],
    "plan": ["plans", "prepares", "proposes"],
}
OBJECTS = ["a new bridge", "a summer festival", "an award", "a research lab",
           "a free clinic", "a night market", "a robot exhibit", "a charity run"]
PLACES = ["springfield", "riverton", "oakdale", "lakeside", "hillview", "portsmouth"]
DAYS = ["on monday", "this week", "on friday", "today", "last night"]
OPENERS = ["breaking:", "update:", "wow!", "news:", "just in:", "hot:"]


def _pareto_count(rng: random.Random, low: int = 10, high: int = 400, alpha: float = 1.1) -> int:
    """A long-tailed sample count: most users have ~10-20 items, a few hundreds."""
    return min(high, int(low * (1.0 - rng.random()) ** (-1.0 / alpha)))


def _crowd_labels() -> dict[str, str]:
    """The crowd's label per topic group: a fact of the task, the same for every seed.

    The base model learns it in pre-training, as an LLM knows majority opinion.
    """
    rng = random.Random("crowd")
    return {group: rng.choice(CLS_LABELS) for group in sorted(TOPIC_GROUPS)}


# --- synth-cls -------------------------------------------------------------

def _cls_pool(seed: int, size: int = 2000) -> list[tuple[str, str, str]]:
    """The shared pool of posts: (item id, text, topic group)."""
    rng = random.Random(f"cls-pool:{seed}")
    pool = []
    for i in range(size):
        group = rng.choice(list(TOPIC_GROUPS))
        topic = rng.choice(list(TOPIC_GROUPS[group]))
        a, b = rng.sample(TOPIC_GROUPS[group][topic], 2)
        text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} the {a} and the {b}"
        pool.append((f"p{i}", text, group))
    return pool


def _cls_user(seed: int, index: int, pool: list[tuple[str, str, str]],
              crowd: dict[str, str]) -> list[Example]:
    rng = random.Random(f"cls-user:{seed}:{index}")
    taste = {g: crowd[g] if rng.random() < 0.5 else rng.choice(CLS_LABELS)
             for g in sorted(TOPIC_GROUPS)}
    items = rng.sample(pool, min(len(pool), _pareto_count(rng)))
    examples = []
    for item_id, text, group in items:
        label = taste[group] if rng.random() < 0.9 else rng.choice(CLS_LABELS)
        examples.append(Example(id=item_id, input=text, output=label))
    return examples


# --- synth-rating ----------------------------------------------------------

def _rating_user(seed: int, index: int) -> list[Example]:
    rng = random.Random(f"rating-user:{seed}:{index}")
    bias = rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0])
    scale = rng.choice([0.5, 1.0, 1.0])
    examples = []
    for j in range(_pareto_count(rng)):
        quality = rng.choice(sorted(QUALITY_WORDS))
        text = (f"the {rng.choice(PRODUCTS)} was {rng.choice(QUALITY_WORDS[quality])} "
                f"{rng.choice(DETAILS)}")
        noise = rng.choice([-1, 1]) if rng.random() < 0.1 else 0
        stars = int(min(5, max(1, round(3 + bias + scale * quality + noise))))
        examples.append(Example(id=f"r{index}-{j}", input=text, output=str(stars)))
    return examples


# --- synth-gen -------------------------------------------------------------

def _gen_user(seed: int, index: int) -> list[Example]:
    rng = random.Random(f"gen-user:{seed}:{index}")
    opener = rng.choice(OPENERS)
    verb_choice = {event: rng.choice(words) for event, words in EVENTS.items()}
    examples = []
    for j in range(_pareto_count(rng)):
        entity, obj, place, day = (rng.choice(ENTITIES), rng.choice(OBJECTS),
                                   rng.choice(PLACES), rng.choice(DAYS))
        event = rng.choice(sorted(EVENTS))
        text = f"{entity} will {event} {obj} in {place} {day}"
        headline = f"{opener} {entity} {verb_choice[event]} {obj} in {place}"
        examples.append(Example(id=f"g{index}-{j}", input=text, output=headline))
    return examples


TASKS: dict[str, TaskSpec] = {
    "synth-cls": TaskSpec(
        name="synth-cls", kind="classification", labels=CLS_LABELS,
        prompt="Post: {input}\nReaction:",
        description="Users label shared posts like/dislike/neutral and disagree by topic."),
    "synth-rating": TaskSpec(
        name="synth-rating", kind="rating", labels=["1", "2", "3", "4", "5"],
        prompt="Review: {input}\nStars:",
        description="Users rate reviews 1-5 with their own bias and use of the scale."),
    "synth-gen": TaskSpec(
        name="synth-gen", kind="generation", max_new_tokens=16,
        prompt="Facts: {input}\nHeadline:",
        description="Users write headlines in their own style (opening word, verbs)."),
}


def generate_samples(task: str, n_users: int, seed: int = 0,
                     first_index: int = 0) -> dict[str, list[Example]]:
    """Unsplit samples for users `first_index .. first_index + n_users - 1`."""
    if task not in TASKS:
        raise ValueError(f"unknown generated task {task!r}; choose one of {sorted(TASKS)}")
    if task == "synth-cls":
        make = partial(_cls_user, seed, pool=_cls_pool(seed), crowd=_crowd_labels())
    elif task == "synth-rating":
        make = partial(_rating_user, seed)
    else:
        make = partial(_gen_user, seed)
    return {f"u{i:06d}": make(i) for i in range(first_index, first_index + n_users)}


def generate(task: str, n_users: int, seed: int = 0, min_samples: int = 10,
             ) -> tuple[TaskSpec, list[UserRecord], SplitReport]:
    """Generate `n_users` users of a task and split them 80/10/10 per user."""
    users, report = split_users(generate_samples(task, n_users, seed), seed=seed,
                                min_samples=min_samples)
    return TASKS[task], users, report
