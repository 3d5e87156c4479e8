"""wsbroadcast: a WebSocket broadcast service over Redis pub/sub."""
