"""`edgellm repo` commands (issue 2)."""

commands: list = []
