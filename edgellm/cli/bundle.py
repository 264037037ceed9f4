"""`edgellm bundle` commands (issue 2)."""

commands: list = []
