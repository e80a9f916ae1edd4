"""Names of every Redis key the service owns, in one place.

Other processes (the `status` command, tests, a dashboard) read these keys, so they
are built here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    prefix: str

    @property
    def groups(self) -> str:
        """Hash: group id -> JSON of the wanted group (its streams)."""
        return f"{self.prefix}:groups"

    @property
    def buffers(self) -> str:
        """Set of frame-list keys the drain must visit (also of stopped groups)."""
        return f"{self.prefix}:buffers"

    @property
    def buffer_heads(self) -> str:
        """Hash: frame-list key -> how many elements were ever removed from its head."""
        return f"{self.prefix}:buffer-heads"

    @property
    def dead_letters(self) -> str:
        """List of JSON records {reason, frame, at} the drain could not store."""
        return f"{self.prefix}:dead-letters"

    @property
    def counters(self) -> str:
        """Hash of service-wide counters (frames drained, rows stored, dead letters)."""
        return f"{self.prefix}:counters"

    @property
    def drain_lock(self) -> str:
        return f"{self.prefix}:lock:drain"

    def frames(self, group_id: str) -> str:
        """List of raw frames (and clock marks) received by one group."""
        return f"{self.prefix}:frames:{group_id}"

    def lease(self, group_id: str) -> str:
        """String with a TTL: the token of the one task allowed to hold the connection."""
        return f"{self.prefix}:lease:{group_id}"

    def starting(self, group_id: str) -> str:
        """Marker with a TTL: a start of this group is queued, do not queue another."""
        return f"{self.prefix}:starting:{group_id}"

    def stop(self, group_id: str) -> str:
        """Flag that tells a running group task to close and exit."""
        return f"{self.prefix}:stop:{group_id}"

    def status(self, group_id: str) -> str:
        """Hash describing the group's connection (state, since, messages, ...)."""
        return f"{self.prefix}:status:{group_id}"
