"""The fixed, seeded workload: 32 chat prompts that ask for long answers, sent greedy and streaming."""

from __future__ import annotations

import math
import random

PROMPTS: tuple[str, ...] = (
    "Write a story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a refrigerator keeps food cold.",
    "Write a story about a robot that learns to paint.",
    "Explain in detail how the human heart pumps blood through the body.",
    "Describe, step by step, how to bake a loaf of bread at home.",
    "Write a story about two friends who get lost in a forest at night.",
    "Explain in detail why the sky is blue during the day and red at sunset.",
    "Write a letter from a sailor to his family describing a storm at sea.",
    "Explain in detail how a bill becomes a law.",
    "Write a story about a cat who becomes the mayor of a small town.",
    "Describe the water cycle and explain each of its stages.",
    "Write a story about a girl who discovers a hidden door in her grandmother's house.",
    "Explain in detail how vaccines train the immune system.",
    "Write a travel guide for a weekend in a city by the sea.",
    "Explain in detail how a computer runs a program, from the source code to the processor.",
    "Write a story about an astronaut who hears music on the Moon.",
    "Describe the life of a honeybee from egg to adult.",
    "Explain in detail how photosynthesis works in plants.",
    "Write a story about a baker who bakes bread that grants wishes.",
    "Explain the causes and effects of the Industrial Revolution.",
    "Write a story about a dragon who is afraid of fire.",
    "Explain in detail how the internet sends a message from one computer to another.",
    "Describe how to plan and plant a vegetable garden.",
    "Write a story about a detective who solves a mystery in a train.",
    "Explain in detail how earthquakes happen and how scientists measure them.",
    "Write a story about a village where it never stops snowing.",
    "Explain in detail how money and banks work.",
    "Write a diary of a week in the life of a medieval knight.",
    "Explain in detail how an airplane stays in the air.",
    "Write a story about a boy who can talk to the wind.",
    "Describe the history of the bicycle and how it changed cities.",
    "Explain in detail how the seasons change during the year.",
)


def workload(seed: int) -> list[str]:
    """The prompts in a seeded order: request j of client c gets `prompt_for(order, c, j, C)`."""
    order = list(PROMPTS)
    random.Random(seed).shuffle(order)
    return order


def requests_per_client(per_client: int, min_requests: int, concurrency: int) -> int:
    """Each client sends at least `per_client` requests, and the point at least `min_requests` in all."""
    return max(per_client, math.ceil(min_requests / concurrency))


def prompt_for(prompts: list[str], client: int, j: int, concurrency: int) -> str:
    return prompts[(client + j * concurrency) % len(prompts)]


def chat_turns(prompt: str) -> list[dict[str, str]]:
    """The conversation every target gets: one user turn, no system prompt (each applies its own chat template)."""
    return [{"role": "user", "content": prompt}]
