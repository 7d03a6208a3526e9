"""Regenerate the demo datasets in this folder, deterministically.

    python examples/data/generate.py [--out examples/data] [--seed 7]

Writes three files in the three formats BrightRun accepts:

* ``support_chat.jsonl`` - chat JSONL, 320 customer-support conversations
  (system / user / assistant, some with two exchanges). The replies follow a
  fixed script per intent and copy details (names, order numbers, products)
  from the question, so a small model's loss falls visibly within an epoch.
* ``support_conversations.json`` - the seeds' conversations format, 12
  conversations with 2-3 training pairs each and scaffolding metadata.
* ``instructions.jsonl`` - instruction JSONL, 60 small text tasks.

The text is synthetic; no real customer data.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

SYSTEM = "You are a friendly support agent for Acme Cloud. Answer briefly and politely."

NAMES = ["Alice", "Bob", "Carmen", "Dmitri", "Esther", "Farid", "Grace", "Hiro", "Ines", "Jonas"]
PRODUCTS = ["Starter plan", "Pro plan", "Team plan", "backup add-on", "storage pack"]
CITIES = ["Berlin", "Lagos", "Lima", "Osaka", "Toronto", "Madrid"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]

INTENTS: dict[str, tuple[list[str], str]] = {
    "refund": (
        [
            "Hi, I'm {name}. I want a refund for order {order}.",
            "Hello, this is {name}. Please refund order {order}, I was charged twice.",
            "{name} here. Can I get my money back for order {order}?",
        ],
        "Hi {name}, I'm sorry about that. I have started a refund for order {order}. "
        "It will reach your account in 3 to 5 business days.",
    ),
    "password": (
        [
            "Hi, I'm {name} and I forgot my password.",
            "Hello, {name} here. I cannot log in, my password does not work.",
            "This is {name}. How do I reset my password?",
        ],
        "Hi {name}, no problem. I have sent a reset link to your email. The link works for 24 hours.",
    ),
    "shipping": (
        [
            "Hi, I'm {name}. Where is my order {order}? It should be in {city} by now.",
            "Hello, this is {name}. Order {order} has not arrived in {city} yet.",
            "{name} here. When will order {order} get to {city}?",
        ],
        "Hi {name}, thanks for waiting. Order {order} is on its way to {city} and should arrive on {day}.",
    ),
    "upgrade": (
        [
            "Hi, I'm {name}. I want to upgrade to the {product}.",
            "Hello, {name} here. How do I switch to the {product}?",
            "This is {name}. Please move my account to the {product}.",
        ],
        "Hi {name}, great choice. Your account now uses the {product}. The new price starts with your next invoice.",
    ),
    "cancel": (
        [
            "Hi, I'm {name}. Please cancel my {product}.",
            "Hello, this is {name}. I don't need the {product} anymore.",
            "{name} here. How can I cancel the {product}?",
        ],
        "Hi {name}, I'm sorry to see you go. I have cancelled your {product}. "
        "You keep access until the end of this month.",
    ),
    "invoice": (
        [
            "Hi, I'm {name}. I need a copy of the invoice for order {order}.",
            "Hello, {name} here. Can you send me the invoice for order {order}?",
            "This is {name}. Where do I find the invoice for order {order}?",
        ],
        "Hi {name}, sure. I have emailed you the invoice for order {order}. "
        "You can also download it from the billing page.",
    ),
}

FOLLOW_UPS = [
    ("Thank you!", "You're welcome, {name}! Have a great day."),
    ("Great, thanks a lot.", "Happy to help, {name}. Is there anything else?"),
    ("That was fast, thanks.", "Glad I could help, {name}. Take care!"),
]


def _slots(rng: random.Random) -> dict[str, str]:
    return {
        "name": rng.choice(NAMES),
        "order": f"{rng.randrange(10000, 99999)}",
        "product": rng.choice(PRODUCTS),
        "city": rng.choice(CITIES),
        "day": rng.choice(DAYS),
    }


def support_chat(rng: random.Random, n: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    intents = sorted(INTENTS)
    i = 0
    while len(rows) < n:  # draw until every conversation is distinct: duplicates over-weight examples
        intent = intents[i % len(intents)]
        questions, answer = INTENTS[intent]
        slots = _slots(rng)
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": rng.choice(questions).format(**slots)},
            {"role": "assistant", "content": answer.format(**slots)},
        ]
        if rng.random() < 0.3:
            thanks, reply = rng.choice(FOLLOW_UPS)
            messages.append({"role": "user", "content": thanks})
            messages.append({"role": "assistant", "content": reply.format(**slots)})
        key = json.dumps(messages, sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append({"messages": messages})
            i += 1
    rng.shuffle(rows)
    return rows


def support_conversations(rng: random.Random, n: int) -> dict[str, Any]:
    personas = ["busy professional", "first-time user", "long-time customer"]
    arcs = ["frustrated_to_relieved", "curious_to_confident", "neutral_to_satisfied"]
    intents = sorted(INTENTS)
    conversations = []
    for i in range(n):
        slots = _slots(rng)
        pairs = []
        context = SYSTEM
        for _ in range(rng.choice([2, 3])):
            intent = rng.choice(intents)
            questions, answer = INTENTS[intent]
            query = rng.choice(questions).format(**slots)
            response = answer.format(**slots)
            pairs.append(
                {
                    "prompt_context": context,
                    "user_query": query,
                    "target_response": response,
                    "scaffolding_metadata": {
                        "persona": personas[i % len(personas)],
                        "emotional_arc": arcs[(i + len(pairs)) % len(arcs)],
                        "topic": intent,
                    },
                }
            )
            context = f"{SYSTEM} Earlier the customer asked: {query}"
        conversations.append({"conversation_id": f"conv-{i + 1:04d}", "training_pairs": pairs})
    return {"conversations": conversations}


def instructions(rng: random.Random, n: int) -> list[dict[str, str]]:
    words = ["cloud", "backup", "invoice", "refund", "storage", "account", "upgrade", "login"]
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    i = 0
    while len(rows) < n:  # distinct rows only
        picked = rng.sample(words, 3)
        kind = i % 3
        if kind == 0:
            row = {
                "instruction": "Write the words in upper case.",
                "input": " ".join(picked),
                "output": " ".join(w.upper() for w in picked),
            }
        elif kind == 1:
            row = {
                "instruction": "Reverse the order of the words.",
                "input": " ".join(picked),
                "output": " ".join(reversed(picked)),
            }
        else:
            a, b = rng.randrange(1, 50), rng.randrange(1, 50)
            row = {"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b)}
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append(row)
            i += 1
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description="Regenerate the demo datasets.")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "support_chat.jsonl", support_chat(random.Random(args.seed), 320))
    with open(args.out / "support_conversations.json", "w", encoding="utf-8", newline="\n") as f:
        json.dump(support_conversations(random.Random(args.seed + 1), 12), f, indent=2)
        f.write("\n")
    write_jsonl(args.out / "instructions.jsonl", instructions(random.Random(args.seed + 2), 60))


if __name__ == "__main__":
    main()
