"""Training, evaluation and ONNX export of Trapline's default detector.

A torchvision Faster R-CNN over an ImageNet EfficientNet-Lite0 backbone, fine-tuned on the real boxes in
``/work/shared/data`` (see ``data.py``), exported with ``export.py`` to
``services/detector/models/default/`` (ONNX + manifest). Run ``python -m trapline.trainer.references.detector.train --help``.
"""
