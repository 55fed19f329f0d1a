"""Internal service APIs."""
