"""Process management: the gunicorn config, our worker class and our WebSocket protocol."""
