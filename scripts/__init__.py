"""Entry points: run, test helpers, publish, health (the coordinator), the load test (load/), mint-token."""
