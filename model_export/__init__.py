"""The offline side: datasets, backbones, model families, training, calibration,
evaluation and ONNX export. Imports the artifact contract and the preprocessing
from :mod:`service`, so training and serving cannot drift.
"""
