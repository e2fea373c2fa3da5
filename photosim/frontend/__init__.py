"""From a float PyTorch model to an integer one: models, data, graph capture, observers, PTQ, torch import."""
