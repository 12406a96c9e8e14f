"""Text in, token batches, activations out: sources, grain token pipeline, producer, cache."""
