"""Model-building scripts (torchvision references style): flat, one purpose each, runnable from the repo."""
