"""Multi-turn environments: what answers the student's tool calls between its turns (see ``base``)."""
