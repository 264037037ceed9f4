"""`edgellm profiles` commands (issue 2)."""

commands: list = []
