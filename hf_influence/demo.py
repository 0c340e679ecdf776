"""A small seeded multi-domain instruction pool and target set, generated in-process.

The main command runs on a fresh machine with no data files, so the project brings its own data: four
domains of chat rows (math word problems with worked solutions, Python code, extractive QA over generated
passages, sentiment classification), each row tagged with its `source`. A selector pointed at the math
target should favour the `demo/math` rows; that is what the demo reports against random.
"""

from __future__ import annotations

import collections
import random

from datasets import Dataset

DOMAINS = ("math", "code", "qa", "classification")

_NAMES = ["Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Keira", "Liam"]
_ITEMS = [("apples", "baskets"), ("pencils", "boxes"), ("cookies", "jars"), ("marbles", "bags"), ("stickers", "sheets")]
_CITIES = ["Lyon", "Porto", "Kyoto", "Austin", "Tromso", "Cusco", "Dakar", "Perth"]
_JOBS = ["baker", "pilot", "nurse", "carpenter", "chemist", "librarian", "gardener", "engineer"]
_ADJECTIVES = {
    "positive": ["wonderful", "delightful", "excellent", "moving", "brilliant"],
    "negative": ["dreadful", "boring", "clumsy", "disappointing", "tedious"],
}
_SUBJECTS = ["film", "novel", "restaurant", "concert", "phone", "hotel"]


def _math(rng: random.Random) -> tuple[str, str, str]:
    name, (item, container) = rng.choice(_NAMES), rng.choice(_ITEMS)
    per, count, eaten = rng.randint(3, 12), rng.randint(2, 9), rng.randint(1, 10)
    total = per * count
    left = total - eaten
    prompt = (
        f"{name} has {count} {container} with {per} {item} in each. {name} gives away {eaten} {item}. "
        f"How many {item} does {name} have left?"
    )
    solution = (
        f"{name} starts with {count} * {per} = {total} {item}. After giving away {eaten}, {name} has "
        f"{total} - {eaten} = {left} {item} left.\n#### {left}"
    )
    return prompt, solution, str(left)


_FUNCTIONS = [
    ("returns the sum of a list of numbers", "total", "def total(values):\n    result = 0\n    for value in values:\n        result += value\n    return result"),
    ("returns the largest number in a list", "largest", "def largest(values):\n    best = values[0]\n    for value in values[1:]:\n        if value > best:\n            best = value\n    return best"),
    ("reverses a string", "reverse", "def reverse(text):\n    return text[::-1]"),
    ("counts the vowels in a string", "count_vowels", "def count_vowels(text):\n    return sum(1 for ch in text.lower() if ch in 'aeiou')"),
    ("checks whether a number is prime", "is_prime", "def is_prime(n):\n    if n < 2:\n        return False\n    for d in range(2, int(n ** 0.5) + 1):\n        if n % d == 0:\n            return False\n    return True"),
    ("returns the squares of a list of numbers", "squares", "def squares(values):\n    return [value * value for value in values]"),
]


def _code(rng: random.Random) -> tuple[str, str, str]:
    description, name, body = rng.choice(_FUNCTIONS)
    style = rng.choice(["Write a Python function", "Implement a Python function", "Give me Python code for a function"])
    return f"{style} `{name}` that {description}.", f"Here is one way to write it:\n\n```python\n{body}\n```", name


def _qa(rng: random.Random) -> tuple[str, str, str]:
    name, city, job = rng.choice(_NAMES), rng.choice(_CITIES), rng.choice(_JOBS)
    years = rng.randint(2, 30)
    passage = (
        f"{name} grew up in {city}. After school, {name} trained as a {job} and has worked as one for "
        f"{years} years. On weekends {name} volunteers at the city library."
    )
    question, answer = rng.choice([
        (f"Where did {name} grow up?", city),
        (f"What is {name}'s job?", f"a {job}"),
        (f"For how many years has {name} worked?", f"{years} years"),
    ])
    return f"Read the passage and answer the question.\n\nPassage: {passage}\n\nQuestion: {question}", answer, answer


def _classification(rng: random.Random) -> tuple[str, str, str]:
    label = rng.choice(["positive", "negative"])
    subject, adjective = rng.choice(_SUBJECTS), rng.choice(_ADJECTIVES[label])
    review = f"The {subject} was {adjective}, and I {'would' if label == 'positive' else 'would not'} recommend it."
    return f"Classify the sentiment of this review as positive or negative.\n\nReview: {review}", label, label


_GENERATORS = {"math": _math, "code": _code, "qa": _qa, "classification": _classification}


def demo_pool(rows_per_domain: int = 25, seed: int = 0, distinct: bool = True) -> Dataset:
    """A shuffled chat-format pool: columns `id`, `source` ("demo/<domain>"), `messages`.

    Args:
        rows_per_domain: rows generated for each of DOMAINS.
        seed: generation and shuffling seed.
        distinct: mark a repeated draw as a variant, so that no row repeats; False keeps repeats (the pools of
            hf-influence 0.5, on which the README's Taylor table was measured).
    """
    rng = random.Random(seed)
    rows = []
    for domain in DOMAINS:
        drawn = collections.Counter()
        for index in range(rows_per_domain):
            prompt, response, _ = _GENERATORS[domain](rng)
            # A domain has few templates: a repeated draw is marked as a variant, so the pool holds no repeated row
            # (which a run warns about) and every row drawn before stays as it was.
            drawn[prompt, response] += 1
            if distinct and drawn[prompt, response] > 1:
                prompt = f"{prompt} (variant {drawn[prompt, response]})"
            rows.append({
                "id": f"demo/{domain}/{index}",
                "source": f"demo/{domain}",
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
            })
    rng.shuffle(rows)
    return Dataset.from_list(rows)


def demo_target(domain: str = "math", rows: int = 8, seed: int = 1) -> Dataset:
    """Target rows of one domain in prompt/answer form (`solution` holds the worked answer for math).

    Args:
        domain: one of DOMAINS.
        rows: number of target rows.
        seed: generation seed (use one different from the pool's to get unseen rows).
    """
    if domain not in _GENERATORS:
        raise ValueError(f"Unknown demo domain {domain!r}: choose from {DOMAINS}.")
    rng = random.Random(seed)
    records = []
    for index in range(rows):
        prompt, response, answer = _GENERATORS[domain](rng)
        records.append({"id": f"target/{domain}/{index}", "task": domain, "prompt": prompt, "answer": answer, "solution": response})
    return Dataset.from_list(records)
