"""Federated fine-tuning, server side: Flower's SuperLink supervised by ``edgellm-server run --fl``,
a Flower ServerApp whose FedAvg strategy refuses malformed device updates and adds differential
privacy, a per-device privacy ledger, the run store, and the publisher that turns the averaged
adapters into a signed, canaried model version. flwr and torch are imported where they are used.
"""
