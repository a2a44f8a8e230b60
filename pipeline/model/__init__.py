"""The network: backbones and block cuts, BN folding, freezing, heads and top models, the
activation cache, the train loop, checkpoints."""
