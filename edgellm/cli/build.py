"""`edgellm build` command (build pipeline II, issue 4)."""

commands: list = []
