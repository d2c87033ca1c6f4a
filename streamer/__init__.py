"""streamer: Kafka, Redis, metrics and the command line around drnn_core."""
