"""Redis -> SQL: parsing frames, the schema and its inserts, the drain and retention.

The store layer meets ingest only at the Redis buffer (`worker.buffer`).
"""
