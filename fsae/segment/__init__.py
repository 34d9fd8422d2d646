"""Segmentation stage: DeepLab V1 / V2 trained on pseudo-masks, multi-scale + flip + CRF inference.

- ``deeplab.py``: the models (ASPP / LargeFOV heads on a dilated backbone, output stride 8) and weight loading.
- ``train.py``: ``train_segmentation`` (poly LR, 10x head, SGD, random scale / flip / crop, resumable).
- ``infer.py``: ``multiscale_probs`` and ``run_seg_inference`` (val PNGs + mIoU, VOC test-server layout).
- ``config.py``: ``SegConfig`` and ``load_seg_config`` (recipes in ``configs/*/deeplab*.yaml``).
"""
