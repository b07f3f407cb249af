"""The HTTP API: the route table, request schemas, and each task's routes."""
