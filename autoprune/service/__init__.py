"""The HTTP service: settings, schemas, request validation, checkpoints, searches, routes, jobs."""
