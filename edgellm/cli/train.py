"""`edgellm train|distill|export|eval` commands (build pipeline I, issue 3)."""

commands: list = []
