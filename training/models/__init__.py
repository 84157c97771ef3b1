"""Models for one device in plain PyTorch (no DeepSpeed inside): BERT and ResNet."""
