"""opdplus."""
