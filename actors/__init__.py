"""Ray actors: thin adapters over the plain classes in `rlhub`, and the controller loop."""
