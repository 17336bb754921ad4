"""llmbus: LLM chat inference over the NATS message bus."""

__version__ = "0.1.0"
