"""Test support, one module per thing: ``servers`` (a real service and its workers), ``waits``
(waiting on conditions), ``clients`` (WebSocket clients and their frames), ``stalled`` (a client that
stops reading), ``recorder`` (an outbound path that records), ``publishers`` (steady publishers, a
backlog), ``proxy`` (a TCP proxy to Redis that can go deaf), ``metrics`` (reading /metrics),
``commands`` (running the project's commands), ``view`` (a client's frames checked against the
contract)."""
