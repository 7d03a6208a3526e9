"""Application services: orchestrate domain decisions, the store and executors."""
