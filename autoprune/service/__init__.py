"""The HTTP service: settings, request schemas and validation, routes, and the job manager."""
