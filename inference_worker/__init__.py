"""llmbus inference worker: continuous-batching engine and its NATS micro service."""
