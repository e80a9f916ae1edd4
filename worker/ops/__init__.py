"""What people run: the CLI, the local stack, status, reports, export and charts."""
