"""Federated fine-tuning on the device (installed with the ``federated`` extra).

    device       torch-free checks: the verified GGUF base, the local text, the profile; decline reasons
    supervisor   start/watch/stop ``flower-supernode``; ``handle_fl_invite`` / ``handle_fl_stop``
    client_app   the Flower ClientApp (torch): LoRA adapters trained on local text
    learn        ``--learn-from-use``: the user's messages kept (capped) as training text, and wiping them

The only part of the agent that may import torch (client_app, lazily). Nothing here is imported
by the rest of the agent at module level.
"""
