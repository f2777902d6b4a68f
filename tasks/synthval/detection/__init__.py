"""The detector: building Faster R-CNN models, checkpoints, the training and prediction loop, several GPUs.

Everything torch lives here; nothing here knows a dataset's file format or where results go.
"""
