"""Socket -> Redis: the websocket session, the group runner and the connect budget.

Nothing here parses payloads or touches SQL: frames go to the Redis buffer
(`worker.buffer`) as raw bytes, and the store layer takes them from there.
"""
