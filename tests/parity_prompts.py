"""The prompts every parity test runs, so the layouts are compared on the same inputs."""

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "1, 2, 3, 4,",
]
NEW_TOKENS = 32
SHARED = "You are a careful assistant. Answer briefly and do not repeat the question. Question: "
SHARED_PREFIX_PROMPTS = [SHARED + tail for tail in ("what is two plus two?", "name a colour.", "what is two plus three?", "")]
"""Prompts sharing a prefix of several KV blocks (the last is the prefix alone: it may share all
but its last block)."""
