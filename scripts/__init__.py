"""Entry points: run, test helpers, publish, health (the coordinator), loadtest, mint-token."""
