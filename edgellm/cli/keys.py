"""`edgellm keys` commands (issue 2)."""

commands: list = []
